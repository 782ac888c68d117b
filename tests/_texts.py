"""Texts the inference and SPLADE tests share: short, empty, duplicate and over-long inputs."""

LONG = " ".join(f"word{i} package library" for i in range(80))  # ~240 words: past every test's max_seq_length
TEXTS = [
    "hello world",
    "a much longer sentence about debian packages and their descriptions that goes on and on",
    "",
    "x y",
    LONG,
    "hello world",  # a duplicate
    "the library provides bindings for the graphics toolkit used by several desktop programs",
]
