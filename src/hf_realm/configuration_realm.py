"""REALM model configuration, field for field the transformers 4.x `RealmConfig` (removed in transformers 5)."""

from __future__ import annotations

from transformers import PreTrainedConfig


RETRIEVER_POOLINGS = ("cls", "mean")


class RealmConfig(PreTrainedConfig):
    r"""
    Configuration of every REALM model: [`RealmEmbedder`], [`RealmScorer`], [`RealmKnowledgeAugEncoder`],
    [`RealmReader`], [`RealmForOpenQA`], [`RealmForMaskedLM`] and [`RealmForInverseClozeTask`], and of
    [`RealmRetriever`].

    The fields and defaults are those of transformers 4.x (`google/realm-cc-news-pretrained-*` architecture), so every
    4.x `config.json` loads unchanged; unknown legacy keys are kept as attributes rather than rejected.

    Args:
        vocab_size (`int`, *optional*, defaults to 30522):
            Vocabulary size of the BERT encoders.
        hidden_size (`int`, *optional*, defaults to 768):
            Dimension of the encoder layers and the pooler layer.
        retriever_proj_size (`int`, *optional*, defaults to 128):
            Dimension of the retriever (embedder) projection.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of hidden layers in each Transformer encoder.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads for each attention layer.
        num_candidates (`int`, *optional*, defaults to 8):
            Number of candidates given to [`RealmScorer`] / [`RealmKnowledgeAugEncoder`] (including the null document
            in pretraining).
        intermediate_size (`int`, *optional*, defaults to 3072):
            Dimension of the feed-forward layer.
        hidden_act (`str`, *optional*, defaults to `"gelu_new"`):
            Activation of the encoder and of the prediction heads.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout of fully connected layers in the embeddings, encoder and pooler.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout of the attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Maximum sequence length.
        type_vocab_size (`int`, *optional*, defaults to 2):
            Vocabulary size of `token_type_ids`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of the encoder layer norms.
        span_hidden_size (`int`, *optional*, defaults to 256):
            Dimension of the reader's span representations.
        max_span_width (`int`, *optional*, defaults to 10):
            Maximum answer span width of the reader.
        reader_layer_norm_eps (`float`, *optional*, defaults to 1e-3):
            Epsilon of the reader's span layer norm.
        reader_beam_size (`int`, *optional*, defaults to 5):
            Number of retrieved blocks the reader reads.
        reader_seq_len (`int`, *optional*, defaults to 320):
            Maximum reader sequence length (288 block wordpieces + 32 question wordpieces).
        num_block_records (`int`, *optional*, defaults to 13353718):
            Number of evidence blocks (REALM's Wikipedia).
        searcher_beam_size (`int`, *optional*, defaults to 5000):
            Number of blocks retrieved for the retriever loss in training. In eval mode [`RealmForOpenQA`] retrieves
            `reader_beam_size` blocks.
        position_embedding_type (`str`, *optional*, defaults to `"absolute"`):
            Only `"absolute"`: 4.x also accepted `"relative_key"` / `"relative_key_query"`, which transformers 5's BERT
            dropped, so such a config is refused rather than run with absolute positions.
        share_embedders (`bool`, *optional*, defaults to `True`):
            Whether [`RealmForMaskedLM`] / [`RealmForInverseClozeTask`] embed queries and documents with one
            embedder (as 4.x's `RealmScorer` does by default). Separate towers barely learn ICT from scratch on small
            data; not a 4.x field.
        retriever_pooling (`str`, *optional*, defaults to `"cls"`):
            How [`RealmEmbedder`] pools a sequence before its projection: `"cls"`, BERT's pooler over `[CLS]` (REALM,
            every 4.x checkpoint), or `"mean"`, the mean of the token states under the attention mask, scaled to unit
            length (how sentence-embedding encoders such as all-MiniLM-L6-v2 are trained to be used; their `[CLS]`
            state and pooler were never trained for retrieval). [`RealmEmbedder.from_bert`] picks `"mean"` for a
            sentence-transformers folder that pools that way. Not a 4.x field.

    Example:

    ```python
    >>> from hf_realm import RealmConfig, RealmEmbedder
    >>> config = RealmConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    >>> model = RealmEmbedder(config)
    >>> config.retriever_proj_size
    128
    ```
    """

    model_type = "realm"

    vocab_size: int = 30522
    hidden_size: int = 768
    retriever_proj_size: int = 128
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_candidates: int = 8
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    span_hidden_size: int = 256
    max_span_width: int = 10
    reader_layer_norm_eps: float = 1e-3
    reader_beam_size: int = 5
    reader_seq_len: int = 320  # 288 + 32
    num_block_records: int = 13353718
    searcher_beam_size: int = 5000
    position_embedding_type: str = "absolute"
    share_embedders: bool = True
    retriever_pooling: str = "cls"
    # 4.x defaults, kept: `pad_token_id` is the `padding_idx` of the word embeddings (REALM's vocab pads with 0,
    # but 4.x checkpoints were trained with this value and old config.json files carry it).
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    # Read by transformers 5's BertModel, which the REALM encoders are built on.
    is_decoder: bool = False
    add_cross_attention: bool = False
    use_cache: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        check_position_embedding_type(self)
        if self.retriever_pooling not in RETRIEVER_POOLINGS:
            raise ValueError(
                f"retriever_pooling: expected one of {list(RETRIEVER_POOLINGS)}, got {self.retriever_pooling!r}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.reader_beam_size > self.searcher_beam_size:
            raise ValueError(
                f"reader_beam_size ({self.reader_beam_size}) must be <= searcher_beam_size ({self.searcher_beam_size})"
            )
        super().__post_init__(**kwargs)


def check_position_embedding_type(config) -> None:
    """Refuse 4.x's relative position embeddings: transformers 5's BERT, which the REALM encoders are built on, has
    only absolute ones, and a checkpoint trained with relative ones would silently compute something else."""
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(
            f"position_embedding_type: expected 'absolute', got {kind!r}. transformers 5's BERT (which hf_realm's "
            "REALM encoders use) dropped relative position embeddings, so this 4.x checkpoint cannot be run as "
            "trained."
        )


__all__ = ["RealmConfig"]
