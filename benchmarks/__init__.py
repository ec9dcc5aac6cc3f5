"""Speed and memory benchmarks of medldm (``make bench``; ``python -m benchmarks --help``).

Every figure is a ratio against a reference measured in the same job, or a time and peak memory with the
machine named, so numbers from different machines are never compared as absolutes.
"""
