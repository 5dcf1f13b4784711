"""What ships: GGUF export for llama.cpp and Ollama, running llama.cpp (`llamacpp`), and the model card with
the hashes that let anyone verify a released folder.

May import: nirvana.core, nirvana.models, nirvana.method.
"""
