"""The read bench's parts (bench/read_path.py): the bare peer it is compared with, and its Python load generator."""
