"""dpr-service: train a DPR bi-encoder, index a corpus with FAISS, serve retrieval and the DPR loss.

The web app lives in its own module and is never imported from here, so ``dpr_service.core`` stays
light for the trainer and the index builder.
"""

__version__ = "0.1.0"
