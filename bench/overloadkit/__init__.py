"""The capacity and overload benchmark's parts (bench/overload.py): stage, generator, steps, report."""
