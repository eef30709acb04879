"""hf_realm: REALM and kNN-MT / kNN-LM for the Hugging Face stack."""

__version__ = "0.1.0"
