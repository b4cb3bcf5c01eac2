"""kubedistill: distil a reasoning LLM relevance teacher into a fast student, on Ray and Kubernetes."""

__version__ = "0.1.0"
