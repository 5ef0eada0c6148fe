"""The index stage: encode a corpus with a checkpoint's passage encoder and build a FAISS artifact.

Not built yet (issue 3); the shared encoding and exact search it will use live in
``dpr_service.core.inference``.
"""
