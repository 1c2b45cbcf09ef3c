"""alignkit: the staged LLM pipeline, one readable file per stage."""

__version__ = "0.1.0"
