"""Engine directories: build (export + backend compile), manifest, and loading runners back for the pipeline."""
