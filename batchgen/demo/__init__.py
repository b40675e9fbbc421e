"""The bundled demo: a tiny LLaMA that batchgen trains itself on a checkable synthetic task.

``task`` defines the problems and their exact-match checker (no torch), ``train`` trains the
model and writes it, with its tokenizer, to ``model/`` in Hugging Face layout.
"""
