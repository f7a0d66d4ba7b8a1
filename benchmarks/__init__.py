"""The measurements fluxtrt maintains and reruns, each run from the repository root as ``python -m benchmarks.NAME``
(the headline table: ``python -m benchmarks.headline``); their results and commands are in benchmarks/results/."""
