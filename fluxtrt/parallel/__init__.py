"""``--gpus N``: one edit with the transformer split over N processes of one host (context parallelism, DESIGN 12).

``launch`` (torch-free until it runs) re-launches a command under torchrun; ``context`` (torch) joins the process
group in each worker and switches the transformer to diffusers' Ulysses attention.
"""
