"""PyTorch REALM models on transformers 5.

A port of the transformers 4.x REALM classes (removed in transformers 5, PR #42235): same class names, forward
arguments, output dataclasses and state-dict key names, with the BERT encoders built on transformers 5's own
`BertModel` (SDPA / flash attention, bf16 and gradient checkpointing come with it). This file holds nn code only:
the corpus and its index live in `corpus_index.py`, the search in `search/`; the models reach an index only through the
protocols of `retrieval.py`.

Fixed relative to 4.x:
- `RealmKnowledgeAugEncoder`'s loss averaged over *every* position when `mlm_mask` was omitted (positions with label
  -100 counted as zero loss), so it shrank with the sequence length; it now averages over the labelled positions.
- `RealmForOpenQA` accepted batch size 1 only; batches now work and give the same answers as one-by-one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN, GELUTanh
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import AttentionInterface
from transformers.models.bert.modeling_bert import BertEmbeddings, BertModel
from transformers.utils import ModelOutput, logging

from .checks import check_token_ids_fit, check_tokenizer_fits
from .configuration_realm import RealmConfig, check_position_embedding_type
from .loading import OTHER_PART, check_adapter_target, checkpoint_part, part_key_mapping, restore_attachments
from .retrieval import BlockIndex, missing_members


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# head_mask: transformers 5 dropped head masking from BERT; 4.x REALM code passes `head_mask`, so it is kept here by
# an eager attention function that multiplies the attention probabilities by the layer's mask, as 4.x did.
# ------------------------------------------------------------------------------------------------------------------

_HEAD_MASK_ATTENTION = "realm_eager_head_mask"


def _head_mask_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    head_mask = kwargs.pop("realm_head_mask")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    weights = weights * head_mask[module.layer_idx]
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


AttentionInterface.register(_HEAD_MASK_ATTENTION, _head_mask_attention_forward)
AttentionMaskInterface.register(_HEAD_MASK_ATTENTION, eager_mask)


def _expand_head_mask(head_mask: torch.Tensor, num_layers: int, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """4.x `get_head_mask`: `(heads,)` or `(layers, heads)` -> `(layers, 1, heads, 1, 1)`."""
    if head_mask.dim() == 1:
        head_mask = head_mask.unsqueeze(0).expand(num_layers, -1)
    if head_mask.dim() != 2 or head_mask.shape != (num_layers, num_heads):
        raise ValueError(
            f"head_mask must have shape ({num_heads},) or ({num_layers}, {num_heads}), got {tuple(head_mask.shape)}"
        )
    return head_mask[:, None, :, None, None].to(dtype)


@contextlib.contextmanager
def _attention_for_head_mask(config: RealmConfig, head_mask):
    if head_mask is None:
        yield {}
        return
    previous = config._attn_implementation
    config._attn_implementation = _HEAD_MASK_ATTENTION
    try:
        yield {"realm_head_mask": head_mask}
    finally:
        config._attn_implementation = previous


# ------------------------------------------------------------------------------------------------------------------
# Output dataclasses (4.x names and fields)
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class RealmEmbedderOutput(ModelOutput):
    """
    Outputs of [`RealmEmbedder`].

    Args:
        projected_score (`torch.FloatTensor` of shape `(batch_size, config.retriever_proj_size)`):
            Projected score.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Hidden states of the embeddings and of every layer, each `(batch_size, sequence_length, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Attention probabilities of every layer, each `(batch_size, num_heads, sequence_length, sequence_length)`.
    """

    projected_score: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RealmScorerOutput(ModelOutput):
    """
    Outputs of [`RealmScorer`].

    Args:
        relevance_score (`torch.FloatTensor` of shape `(batch_size, config.num_candidates)`):
            The relevance score of document candidates (before softmax).
        query_score (`torch.FloatTensor` of shape `(batch_size, config.retriever_proj_size)`):
            Query score derived from the query embedder.
        candidate_score (`torch.FloatTensor` of shape `(batch_size, config.num_candidates, config.retriever_proj_size)`):
            Candidate score derived from the embedder.
    """

    relevance_score: torch.FloatTensor | None = None
    query_score: torch.FloatTensor | None = None
    candidate_score: torch.FloatTensor | None = None


@dataclass
class RealmReaderOutput(ModelOutput):
    """
    Outputs of [`RealmReader`] (and `reader_output` of [`RealmForOpenQA`]).

    With a batch of `B > 1` questions in [`RealmForOpenQA`], `retriever_loss`, `reader_loss`, `block_idx`,
    `candidate`, `start_pos` and `end_pos` get a leading batch dimension, `retriever_correct` is `(B, searcher_beam)`
    and `reader_correct` is a tuple of `B` tensors (each question's span candidates depend on its own length).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Total loss (mean over the batch).
        retriever_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Retriever loss.
        reader_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Reader loss.
        retriever_correct (`torch.BoolTensor` of shape `(config.searcher_beam_size,)`, *optional*):
            Whether or not an evidence block contains the answer.
        reader_correct (`torch.BoolTensor` of shape `(config.reader_beam_size, num_candidates)`, *optional*):
            Whether or not a span candidate contains the answer.
        block_idx (`torch.LongTensor` of shape `()`):
            Index of the retrieved evidence block holding the predicted answer.
        candidate (`torch.LongTensor` of shape `()`):
            Index of the predicted span candidate.
        start_pos (`torch.LongTensor` of shape `(1,)`):
            Predicted answer start position in the reader's inputs.
        end_pos (`torch.LongTensor` of shape `(1,)`):
            Predicted answer end position in the reader's inputs.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Reader hidden states.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Reader attention probabilities.
    """

    loss: torch.FloatTensor | None = None
    retriever_loss: torch.FloatTensor | None = None
    reader_loss: torch.FloatTensor | None = None
    retriever_correct: torch.BoolTensor | None = None
    reader_correct: torch.BoolTensor | tuple[torch.BoolTensor, ...] | None = None
    block_idx: torch.LongTensor | None = None
    candidate: torch.LongTensor | None = None
    start_pos: torch.LongTensor | None = None
    end_pos: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RealmForOpenQAOutput(ModelOutput):
    """
    Outputs of [`RealmForOpenQA`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `reader_output.loss`, surfaced so that `Trainer` finds it (not in 4.x, which had no `Trainer` support;
            `return_dict=False` still returns 4.x's `(reader_output, predicted_answer_ids)`).
        reader_output (`RealmReaderOutput`):
            Reader output.
        predicted_answer_ids (`torch.LongTensor` of shape `(answer_sequence_length,)`):
            Predicted answer ids; with a batch of `B > 1` questions, a list of `B` such tensors.
        predicted_answer_spans (`list[tuple[int, int, int]]`):
            Where each question's predicted answer lies (not in 4.x): `(block_id, first_token, last_token)`, the
            block's row in the retriever's records and the answer's first and last token among the block's own
            tokens. [`RealmRetriever.span_text`] turns it into the answer as the block's text has it (case, accents
            and spacing kept), where `tokenizer.decode(predicted_answer_ids)` gives the tokenizer's normalised form.
    """

    loss: torch.FloatTensor | None = None
    reader_output: RealmReaderOutput | None = None
    predicted_answer_ids: torch.LongTensor | list[torch.LongTensor] | None = None
    predicted_answer_spans: list[tuple[int, int, int]] | None = None


# ------------------------------------------------------------------------------------------------------------------
# Heads (4.x module names, so 4.x state dicts load unchanged)
# ------------------------------------------------------------------------------------------------------------------


class RealmPredictionHeadTransform(nn.Module):
    def __init__(self, config: RealmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _fast_activation(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class RealmLMPredictionHead(nn.Module):
    def __init__(self, config: RealmConfig):
        super().__init__()
        self.transform = RealmPredictionHeadTransform(config)
        # The decoder bias is tied to `bias` (`_tied_weights_keys`), as in 4.x and transformers 5's BERT.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class RealmOnlyMLMHead(nn.Module):
    def __init__(self, config: RealmConfig):
        super().__init__()
        self.predictions = RealmLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class RealmScorerProjection(nn.Module):
    def __init__(self, config: RealmConfig):
        super().__init__()
        # Unused by the forward pass; kept because every 4.x embedder checkpoint carries these weights.
        self.predictions = RealmLMPredictionHead(config)
        self.dense = nn.Linear(config.hidden_size, config.retriever_proj_size)
        self.LayerNorm = nn.LayerNorm(config.retriever_proj_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states))


def _mask_to_score(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (1.0 - mask.type(dtype)) * torch.finfo(dtype).min


def span_candidates(masks: torch.Tensor, max_span_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All spans of width 1..`max_span_width` over `masks` `(num_blocks, seq_len)`: starts, ends and a
    `(num_blocks, num_spans)` mask of spans lying inside the evidence block (4.x enumeration order)."""
    max_sequence_len = masks.shape[1]
    starts, ends = [], []
    for width in range(1, max_span_width + 1):
        starts.append(torch.arange(max_sequence_len - width + 1, device=masks.device))
        ends.append(torch.arange(width - 1, max_sequence_len, device=masks.device))
    starts, ends = torch.cat(starts), torch.cat(ends)
    span_masks = masks.index_select(-1, starts) * masks.index_select(-1, ends)
    return starts, ends, span_masks


class RealmReaderProjection(nn.Module):
    def __init__(self, config: RealmConfig):
        super().__init__()
        self.config = config
        self.dense_intermediate = nn.Linear(config.hidden_size, config.span_hidden_size * 2)
        self.dense_output = nn.Linear(config.span_hidden_size, 1)
        self.layer_normalization = nn.LayerNorm(config.span_hidden_size, eps=config.reader_layer_norm_eps)
        self.relu = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor, block_mask: torch.Tensor):
        start_projection, end_projection = self.dense_intermediate(hidden_states).chunk(2, dim=-1)
        candidate_starts, candidate_ends, candidate_mask = span_candidates(block_mask, self.config.max_span_width)
        candidate_hidden = start_projection.index_select(1, candidate_starts) + end_projection.index_select(
            1, candidate_ends
        )
        candidate_hidden = self.layer_normalization(self.relu(candidate_hidden))
        reader_logits = self.dense_output(candidate_hidden).squeeze(-1)
        reader_logits = reader_logits + _mask_to_score(candidate_mask, dtype=reader_logits.dtype)
        return reader_logits, candidate_starts, candidate_ends


# ------------------------------------------------------------------------------------------------------------------
# Base class and encoders
# ------------------------------------------------------------------------------------------------------------------


class RealmPreTrainedModel(PreTrainedModel):
    """Base class of the REALM models: weight initialisation, checkpoint loading, the shared config."""

    config_class = RealmConfig
    config: RealmConfig
    base_model_prefix = "realm"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Buffers that older (transformers < 4.31) REALM checkpoints saved; 4.x's `query_embedder.*` copies when the scorer
    # shares its embedder (see `RealmScorer`).
    # and the weights of the other parts when one part is loaded from a composite checkpoint (see `loading.py`).
    _keys_to_ignore_on_load_unexpected = [r"position_ids$", r"embeddings\.token_type_ids$", rf"^{OTHER_PART}\."]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing checkpoints of another model type up front (a BERT checkpoint
        would otherwise load with every REALM weight missing; see [`RealmEmbedder.from_bert`] for those), and loading
        REALM checkpoints of another class only as one of their parts:

        - a part class on a composite checkpoint (`RealmEmbedder` or `AutoModel` on what `RealmForOpenQA` or
          `RealmForMaskedLM` saved) loads that part's trained weights when the part is unambiguous, and otherwise
          raises an error naming what to load (never a randomly initialised model);
        - from a local directory, `index/` (a saved [`RealmBlockIndex`]) is restored into `model.index`, and for
          [`RealmForOpenQA`] the saved block records and tokenizer into `model.retriever`, unless `index=` /
          `retriever=` are given (`index=None` keeps it unset).
        """
        config = kwargs.get("config")
        if pretrained_model_name_or_path is not None and not isinstance(config, PreTrainedConfig):
            hub_kwargs = {
                k: kwargs[k]
                for k in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
                if k in kwargs
            }
            config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            model_type = config_dict.get("model_type")
            if model_type is not None and model_type != RealmConfig.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a checkpoint of model_type '{model_type}', expected "
                    f"'{RealmConfig.model_type}'. To start a REALM model from a BERT-family encoder use "
                    f"{cls.__name__}.from_bert(...)."
                )
            architectures, shared = config_dict.get("architectures"), config_dict.get("share_embedders", True)
        else:  # the Auto classes pass the config they read
            architectures, shared = getattr(config, "architectures", None), getattr(config, "share_embedders", True)
        check_adapter_target(cls.__name__, pretrained_model_name_or_path, kwargs)
        if pretrained_model_name_or_path is not None:
            path = os.fspath(pretrained_model_name_or_path)
            part = checkpoint_part(cls.__name__, path, architectures, shared)
            if part is not None and "key_mapping" not in kwargs:
                logger.info(f"{path} holds a {architectures[0]}: loading its {part} as {cls.__name__}")
                kwargs["key_mapping"] = part_key_mapping(part)
        # Attached objects are set after loading: transformers deep-copies keyword arguments while reading the config,
        # which would copy a whole corpus index (or fail on its lock).
        attached = {name: kwargs.pop(name) for name in ("index", "retriever") if name in kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True`: (model, info)
        for name, value in attached.items():
            setattr(model, name, value)
        if pretrained_model_name_or_path is not None:
            restore_attachments(model, os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder"), attached)
        return loaded

    @classmethod
    def from_bert(cls, bert, *model_args, **config_overrides):
        r"""
        Start a REALM model from a BERT-family encoder: every BERT inside the model (embedder, reader, encoder)
        gets the encoder's weights; the REALM heads are initialised fresh. A sentence-transformers folder that pools by
        the mean of the token states (all-MiniLM-L6-v2's, say) gives `retriever_pooling="mean"` unless set here. The
        retriever projection starts at random, as REALM's; [`init_retriever_projection`] starts it from a corpus.

        Args:
            bert (`str`, `os.PathLike` or [`~transformers.PreTrainedModel`]):
                A BERT-family checkpoint (path or Hub id, loaded with `AutoModel`) or model.
            model_args: Extra positional arguments of the model class (e.g. a retriever).
            config_overrides: REALM fields to set (e.g. `retriever_proj_size=128`, `num_candidates=8`).

        Example:

        ```python
        >>> from transformers import BertConfig, BertModel
        >>> from hf_realm import RealmEmbedder
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                             intermediate_size=37))
        >>> embedder = RealmEmbedder.from_bert(bert, retriever_proj_size=16)
        >>> bool((embedder.realm.encoder.layer[0].output.dense.weight == bert.encoder.layer[0].output.dense.weight).all())
        True
        ```
        """
        from transformers import AutoModel

        source = AutoModel.from_pretrained(bert) if isinstance(bert, (str, os.PathLike)) else bert
        source = getattr(source, "base_model", source)
        bert_config = source.config
        if "retriever_pooling" not in config_overrides:
            where = bert if isinstance(bert, (str, os.PathLike)) else getattr(source, "name_or_path", None)
            pooling = sentence_transformers_pooling(where) if where else None
            if pooling is not None:
                logger.info(f"{where}: a sentence-transformers encoder pooling by {pooling!r}; retriever_pooling set")
                config_overrides["retriever_pooling"] = pooling
        fields = {
            name: getattr(bert_config, name)
            for name in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "max_position_embeddings",
                "type_vocab_size",
                "initializer_range",
                "layer_norm_eps",
                "pad_token_id",
            )
            if getattr(bert_config, name, None) is not None
        }
        fields.update(config_overrides)
        model = cls(RealmConfig(**fields), *model_args)
        state = source.state_dict()
        embedder_berts = {f"{n}.realm".lstrip(".") for n, m in model.named_modules() if isinstance(m, RealmEmbedder)}
        for name, module in model.named_modules():
            if isinstance(module, BertModel):
                missing, unexpected = module.load_state_dict(state, strict=False)
                no_pooler = [k for k in missing if k.startswith("pooler.")]
                missing = [k for k in missing if not k.startswith("pooler.")]
                if no_pooler and model.config.retriever_pooling == "cls" and name in embedder_berts:
                    logger.warning_once(
                        f"{type(source).__name__} has no pooler weights: the retriever's [CLS] pooler starts "
                        "random (retriever_pooling='mean' pools the token states instead)"
                    )
                if missing or unexpected:
                    raise ValueError(
                        f"{type(source).__name__} does not fit the BERT at {name or cls.__name__}: missing {missing}, "
                        f"unexpected {unexpected}"
                    )
        return model

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RealmLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)

    @staticmethod
    def _flatten_inputs(*inputs):
        """Flatten inputs' shape to `(-1, input_shape[-1])`."""
        return [t if t is None or t.dim() <= 2 else t.reshape(-1, t.shape[-1]) for t in inputs]

    def _encode(
        self,
        encoder: BertModel,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
    ):
        """Run a BERT encoder with the 4.x arguments (`head_mask` included)."""
        kwargs = {}
        if output_attentions is not None:
            kwargs["output_attentions"] = output_attentions
        if output_hidden_states is not None:
            kwargs["output_hidden_states"] = output_hidden_states
        if head_mask is not None:
            head_mask = _expand_head_mask(
                head_mask, self.config.num_hidden_layers, self.config.num_attention_heads, encoder.dtype
            )
        with _attention_for_head_mask(encoder.config, head_mask) as extra:
            return encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                return_dict=True,
                **kwargs,
                **extra,
            )


def _fast_activation(config: RealmConfig):
    """REALM's `gelu_new` (the tanh GELU) as PyTorch's fused kernel: the same function up to rounding, one kernel
    instead of seven elementwise passes over the widest activations of the model."""
    if config.hidden_act == "gelu_new":
        return GELUTanh()
    return ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act


def _bert(config: RealmConfig) -> BertModel:
    # The BERT shares the REALM config object, so the attention implementation, dtype and gradient checkpointing set
    # on the REALM model apply to it.
    check_position_embedding_type(config)  # 4.x code may set it on the config after construction
    bert = BertModel(config, add_pooling_layer=True)
    if config.hidden_act == "gelu_new":
        for layer in bert.encoder.layer:
            layer.intermediate.intermediate_act_fn = _fast_activation(config)
    return bert


def sentence_transformers_pooling(name_or_path: str | os.PathLike) -> str | None:
    """``"mean"`` for a sentence-transformers encoder trained with mean pooling, read from its `modules.json` and
    pooling config (in a local folder, or a Hub repository's files already in the local cache: nothing is downloaded);
    ``None`` otherwise: a plain BERT checkpoint, one whose files are not at hand, or another pooling (its `[CLS]`
    pooling reads the raw state, not BERT's pooler: REALM's `"cls"` stays, with a warning for other poolings)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    name = os.fspath(name_or_path)

    def read(filename):
        if os.path.isdir(name):
            path = os.path.join(name, filename)
        else:
            try:
                path = try_to_load_from_cache(name, filename)
            except ValueError:  # not a repository id
                return None
        if not isinstance(path, str) or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    modules = read("modules.json")
    if not isinstance(modules, list):
        return None
    pooling = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is None:
        return None
    folder = pooling.get("path") or ""
    config = read(f"{folder}/config.json" if folder else "config.json") or {}
    modes = {k for k, v in config.items() if k.startswith("pooling_mode_") and v is True}
    if modes == {"pooling_mode_mean_tokens"}:
        return "mean"
    if modes != {"pooling_mode_cls_token"}:
        logger.warning(
            f"{name_or_path}: sentence-transformers pooling {sorted(modes)} has no retriever_pooling; 'cls' kept"
        )
    return None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``hidden`` `(batch, seq, dim)` over the positions ``attention_mask`` keeps (all without one), scaled
    to unit length: the sentence embedding of encoders trained with mean pooling (`retriever_pooling="mean"`).
    Summed in float32; returned in ``hidden``'s dtype."""
    states = hidden.float()
    if attention_mask is None:
        pooled = states.mean(dim=1)
    else:
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1).to(hidden.dtype)


def _return(output: ModelOutput, return_dict: bool | None, config: RealmConfig):
    return_dict = return_dict if return_dict is not None else config.return_dict
    return output if return_dict else output.to_tuple()


class RealmEmbedder(RealmPreTrainedModel):
    """
    The embedder of REALM: BERT's pooled `[CLS]` output (or, with `config.retriever_pooling="mean"`, the unit-length
    mean of its token states) projected to `config.retriever_proj_size` dimensions, used to score the relevance of a
    document to a query by inner product.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmEmbedder
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16)
    >>> model = RealmEmbedder(config).eval()
    >>> model(torch.tensor([[2, 10, 11, 3]])).projected_score.shape
    torch.Size([1, 16])
    ```
    """

    _tied_weights_keys = {"cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.realm = _bert(config)
        self.cls = RealmScorerProjection(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.realm.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.realm.embeddings.word_embeddings = value

    def pooled_output(self, outputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the projection reads from the BERT's ``outputs``: its pooler output (`retriever_pooling="cls"`) or the
        unit-length mean of its token states under ``attention_mask`` (`"mean"`)."""
        if self.config.retriever_pooling == "mean":
            return mean_pool(outputs.last_hidden_state, attention_mask)
        return outputs.pooler_output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        head_mask: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | RealmEmbedderOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids (`[CLS] text [SEP]` or `[CLS] title [SEP] body [SEP]`).
            attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds, output_attentions,
            output_hidden_states, return_dict: as in 4.x / BERT.
        """
        outputs = self._encode(
            self.realm,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            head_mask,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        projected_score = self.cls(self.pooled_output(outputs, attention_mask))
        output = RealmEmbedderOutput(
            projected_score=projected_score, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return _return(output, return_dict, self.config)


class _QueryEmbedderMixin:
    """`query_embedder` is the doc `embedder` itself unless a separate one is registered as a sub-module."""

    def __getattr__(self, name):
        if name == "query_embedder":
            modules = self.__dict__["_modules"]
            return modules["query_embedder"] if "query_embedder" in modules else modules["embedder"]
        return super().__getattr__(name)

    def get_input_embeddings(self):
        return self.embedder.get_input_embeddings()


class RealmScorer(_QueryEmbedderMixin, RealmPreTrainedModel):
    r"""
    The scorer of REALM: relevance scores (before softmax) of `num_candidates` documents per query.

    Args:
        config ([`RealmConfig`]): Model configuration.
        query_embedder ([`RealmEmbedder`], *optional*):
            Embedder for the queries. If not given, the candidates' embedder also embeds the queries (4.x default).

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmScorer
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, num_candidates=3)
    >>> model = RealmScorer(config).eval()
    >>> out = model(torch.tensor([[2, 10, 3]]), candidate_input_ids=torch.randint(5, 99, (1, 3, 6)))
    >>> out.relevance_score.shape
    torch.Size([1, 3])
    ```
    """

    # 4.x saved the shared query embedder twice (`query_embedder.*` = `embedder.*`).
    _keys_to_ignore_on_load_unexpected = RealmPreTrainedModel._keys_to_ignore_on_load_unexpected + [
        r"^query_embedder\."
    ]

    def __init__(self, config: RealmConfig, query_embedder: RealmEmbedder | None = None):
        super().__init__(config)
        self.embedder = RealmEmbedder(config)
        if query_embedder is not None:
            self.query_embedder = query_embedder
            # `from_pretrained` re-creates non-persistent buffers (position ids) and fills them through
            # `_init_weights`, which skips modules already initialised: let it reach the passed embedder's buffers.
            for module in query_embedder.modules():
                if isinstance(module, BertEmbeddings):
                    module._is_hf_initialized = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        candidate_input_ids: torch.LongTensor | None = None,
        candidate_attention_mask: torch.FloatTensor | None = None,
        candidate_token_type_ids: torch.LongTensor | None = None,
        candidate_inputs_embeds: torch.FloatTensor | None = None,
        head_mask: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | RealmScorerOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Query token ids.
            candidate_input_ids (`torch.LongTensor` of shape `(batch_size, num_candidates, candidate_length)`):
                Candidate token ids; `candidate_attention_mask` / `candidate_token_type_ids` have the same shape.
            candidate_inputs_embeds (`torch.FloatTensor` of shape `(batch_size * num_candidates, candidate_length,
            hidden_size)`, *optional*):
                Embedded candidates instead of `candidate_input_ids`.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or input_embeds.")
        if candidate_input_ids is None and candidate_inputs_embeds is None:
            raise ValueError("You have to specify either candidate_input_ids or candidate_inputs_embeds.")
        num_candidates = self.config.num_candidates
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if candidate_input_ids is not None and tuple(candidate_input_ids.shape[:2]) != (batch_size, num_candidates):
            raise ValueError(
                f"candidate_input_ids must have shape (batch_size={batch_size}, num_candidates={num_candidates}, "
                f"length), got {tuple(candidate_input_ids.shape)}"
            )
        if candidate_inputs_embeds is not None and candidate_inputs_embeds.shape[0] != batch_size * num_candidates:
            raise ValueError(
                f"candidate_inputs_embeds must have {batch_size * num_candidates} rows (batch_size * num_candidates), "
                f"got {candidate_inputs_embeds.shape[0]}"
            )
        for name, tensor in (
            ("candidate_attention_mask", candidate_attention_mask),
            ("candidate_token_type_ids", candidate_token_type_ids),
        ):
            if tensor is not None and candidate_input_ids is not None and tensor.shape != candidate_input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of candidate_input_ids {tuple(candidate_input_ids.shape)}, "
                    f"got {tuple(tensor.shape)}"
                )

        query_outputs = self.query_embedder(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        flat_ids, flat_mask, flat_types = self._flatten_inputs(
            candidate_input_ids, candidate_attention_mask, candidate_token_type_ids
        )
        candidate_outputs = self.embedder(
            flat_ids,
            attention_mask=flat_mask,
            token_type_ids=flat_types,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=candidate_inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        query_score = query_outputs.projected_score
        candidate_score = candidate_outputs.projected_score.view(-1, num_candidates, self.config.retriever_proj_size)
        relevance_score = torch.einsum("bd,bnd->bn", query_score, candidate_score)
        output = RealmScorerOutput(
            relevance_score=relevance_score, query_score=query_score, candidate_score=candidate_score
        )
        return _return(output, return_dict, self.config)


class RealmKnowledgeAugEncoder(RealmPreTrainedModel):
    """
    The knowledge-augmented encoder of REALM: a BERT with an MLM head over `[CLS] x [SEP] z [SEP]` for each of
    `num_candidates` retrieved documents `z`, trained with the marginal log-likelihood
    `log sum_z p(z|x) p(y|z,x)` over the masked positions.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmKnowledgeAugEncoder
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, num_candidates=2)
    >>> model = RealmKnowledgeAugEncoder(config).eval()
    >>> ids = torch.randint(5, 99, (1, 2, 8))
    >>> labels = torch.full((1, 8), -100)
    >>> labels[0, 3] = 42
    >>> out = model(ids, relevance_score=torch.zeros(1, 2), labels=labels)
    >>> out.logits.shape
    torch.Size([2, 8, 99])
    ```
    """

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "realm.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.realm = _bert(config)
        self.cls = RealmOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.realm.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.realm.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        head_mask: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        relevance_score: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        mlm_mask: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | MaskedLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, num_candidates, sequence_length)`):
                Joint `[CLS] x [SEP] z [SEP]` token ids for every candidate.
            relevance_score (`torch.FloatTensor` of shape `(batch_size, num_candidates)`, *optional*):
                Retrieval logits from [`RealmScorer`]; required with `labels`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                MLM labels, -100 where no loss is computed.
            mlm_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions (1) that count in the loss. Defaults to the labelled positions (`labels != -100`); 4.x
                defaulted to all positions, diluting the loss by the share of unlabelled ones.
        """
        if labels is not None and relevance_score is None:
            raise ValueError(
                "You have to specify `relevance_score` when `labels` is specified in order to compute loss."
            )
        flat_ids, flat_mask, flat_types = self._flatten_inputs(input_ids, attention_mask, token_type_ids)
        outputs = self._encode(
            self.realm,
            flat_ids,
            flat_mask,
            flat_types,
            position_ids,
            head_mask,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        prediction_scores = self.cls(outputs.last_hidden_state)

        masked_lm_loss = None
        if labels is not None:
            batch_size, seq_length = labels.shape
            num_candidates = self.config.num_candidates
            if tuple(relevance_score.shape) != (batch_size, num_candidates):
                raise ValueError(
                    f"relevance_score must have shape (batch_size={batch_size}, num_candidates={num_candidates}), "
                    f"got {tuple(relevance_score.shape)}"
                )
            if prediction_scores.shape[:2] != (batch_size * num_candidates, seq_length):
                raise ValueError(
                    f"input_ids must hold batch_size * num_candidates = {batch_size * num_candidates} sequences of "
                    f"length {seq_length} (the labels' length), got {tuple(prediction_scores.shape[:2])}"
                )
            mlm_mask = (labels != -100) if mlm_mask is None else mlm_mask
            mlm_mask = mlm_mask.to(torch.float32)
            masked_lm_log_prob = -CrossEntropyLoss(reduction="none")(
                prediction_scores.view(-1, self.config.vocab_size).float(),
                labels.tile(1, num_candidates).view(-1),
            ).view(batch_size, num_candidates, seq_length)
            candidate_log_prob = relevance_score.float().log_softmax(-1).unsqueeze(-1)
            marginal_gold_log_probs = (candidate_log_prob + masked_lm_log_prob).logsumexp(1)
            masked_lm_loss = -torch.nansum(torch.sum(marginal_gold_log_probs * mlm_mask) / torch.sum(mlm_mask))

        output = MaskedLMOutput(
            loss=masked_lm_loss,
            logits=prediction_scores,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return _return(output, return_dict, self.config)


def _marginal_log_loss(logits: torch.Tensor, is_correct: torch.Tensor) -> torch.Tensor:
    """Negative marginal log-likelihood of the correct entries of `logits` (last dim)."""
    log_numerator = torch.logsumexp(logits + _mask_to_score(is_correct, dtype=logits.dtype), dim=-1)
    log_denominator = torch.logsumexp(logits, dim=-1)
    return log_denominator - log_numerator


class RealmReader(RealmPreTrainedModel):
    """
    The reader of REALM: scores answer spans (up to `max_span_width` wordpieces) inside the evidence part of
    `[CLS] question [SEP] block [SEP]` for the top `reader_beam_size` retrieved blocks, adds each block's retrieval
    logit, and trains with the marginal losses of ORQA (retriever over `searcher_beam_size` blocks, reader over spans).

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmReader
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, reader_beam_size=2, searcher_beam_size=3, max_span_width=3)
    >>> model = RealmReader(config).eval()
    >>> block_mask = torch.zeros(3, 10, dtype=torch.bool)
    >>> block_mask[:, 5:9] = True
    >>> out = model(torch.randint(5, 99, (2, 10)), relevance_score=torch.zeros(3), block_mask=block_mask)
    >>> bool(block_mask[0, out.start_pos]) and bool(out.end_pos - out.start_pos < 3)
    True
    ```
    """

    _tied_weights_keys = {"cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.realm = _bert(config)
        # Unused by the forward pass; kept because 4.x reader checkpoints carry these weights.
        self.cls = RealmOnlyMLMHead(config)
        self.qa_outputs = RealmReaderProjection(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.realm.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.realm.embeddings.word_embeddings = value

    def _check_reader_inputs(
        self, num_read, seq_len, relevance_score, block_mask, start_positions, end_positions, has_answers
    ):
        if relevance_score is None:
            raise ValueError("You have to specify `relevance_score` to calculate logits and loss.")
        if block_mask is None:
            raise ValueError("You have to specify `block_mask` to separate question block and evidence block.")
        if seq_len < self.config.max_span_width:
            raise ValueError(
                f"The input sequence length ({seq_len}) must be greater than or equal to config.max_span_width "
                f"({self.config.max_span_width})."
            )
        if num_read > self.config.reader_beam_size:
            raise ValueError(
                f"The reader reads at most config.reader_beam_size = {self.config.reader_beam_size} blocks, got "
                f"input_ids for {num_read}"
            )
        if relevance_score.dim() != 1 or relevance_score.shape[0] < num_read:
            raise ValueError(
                f"relevance_score must have shape (searcher_beam_size,) with at least {num_read} entries (one per "
                f"block read), got {tuple(relevance_score.shape)}"
            )
        num_searched = relevance_score.shape[0]
        if block_mask.dim() != 2 or block_mask.shape[0] < num_read or block_mask.shape[1] != seq_len:
            raise ValueError(
                f"block_mask must have shape (>= {num_read}, {seq_len}) (blocks, the input length), got "
                f"{tuple(block_mask.shape)}"
            )
        if has_answers is not None and has_answers.shape[0] != num_searched:
            raise ValueError(
                f"has_answers must have one entry per searched block ({num_searched}, the length of "
                f"relevance_score), got {tuple(has_answers.shape)}"
            )
        for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            if positions is not None and positions.shape[0] < num_read:
                raise ValueError(
                    f"{name} must have at least {num_read} rows (one per block read), got {tuple(positions.shape)}"
                )

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        """The reader's BERT over `[CLS] question [SEP] block [SEP]` (`BaseModelOutput`; `head_mask` and the other
        4.x arguments of `forward` are accepted)."""
        return self._encode(self.realm, input_ids, attention_mask, token_type_ids, **kwargs)

    def read_spans(
        self,
        sequence_output: torch.Tensor,
        relevance_score: torch.Tensor,
        block_mask: torch.Tensor,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        has_answers: torch.Tensor | None = None,
    ) -> RealmReaderOutput:
        """Span scores and ORQA losses of one question from the encoded blocks it reads (what `forward` does after
        [`~RealmReader.encode`]); the arguments are checked as in `forward`.

        Args:
            sequence_output (`torch.Tensor` of shape `(num_read, sequence_length, hidden_size)`): From `encode`.
            relevance_score, block_mask, start_positions, end_positions, has_answers: As in `forward`.
        """
        self._check_reader_inputs(
            sequence_output.shape[0],
            sequence_output.shape[1],
            relevance_score,
            block_mask,
            start_positions,
            end_positions,
            has_answers,
        )
        return self._read(sequence_output, relevance_score, block_mask, start_positions, end_positions, has_answers)

    def _read(self, sequence_output, relevance_score, block_mask, start_positions, end_positions, has_answers):
        """Span scoring and ORQA losses for one question's `num_read` blocks (4.x semantics)."""
        num_read = sequence_output.shape[0]
        reader_logits, candidate_starts, candidate_ends = self.qa_outputs(sequence_output, block_mask[:num_read])
        reader_logits = reader_logits + relevance_score[:num_read].unsqueeze(-1).to(reader_logits.dtype)
        predicted_block_index = torch.argmax(torch.max(reader_logits, dim=1).values)
        predicted_candidate = torch.argmax(torch.max(reader_logits, dim=0).values)
        predicted_start = candidate_starts.index_select(0, predicted_candidate.view(1))
        predicted_end = candidate_ends.index_select(0, predicted_candidate.view(1))

        total_loss = retriever_loss = reader_loss = retriever_correct = reader_correct = None
        if start_positions is not None and end_positions is not None and has_answers is not None:
            # -1 marks "no answer"; positions outside the inputs are ignored.
            ignored_index = sequence_output.size(1)
            start_positions = start_positions.clamp(-1, ignored_index)
            end_positions = end_positions.clamp(-1, ignored_index)
            retriever_correct = has_answers
            is_gold_start = candidate_starts[None, None, :] == start_positions[:num_read].unsqueeze(-1)
            is_gold_end = candidate_ends[None, None, :] == end_positions[:num_read].unsqueeze(-1)
            reader_correct = (is_gold_start & is_gold_end).any(1)
            retriever_loss = _marginal_log_loss(relevance_score, retriever_correct)
            reader_loss = _marginal_log_loss(reader_logits.view(-1), reader_correct.view(-1))
            retriever_loss = retriever_loss * retriever_correct.any().to(retriever_loss.dtype)
            reader_loss = reader_loss * reader_correct.any().to(reader_loss.dtype)
            total_loss = (retriever_loss + reader_loss).mean()
        return RealmReaderOutput(
            loss=total_loss,
            retriever_loss=retriever_loss,
            reader_loss=reader_loss,
            retriever_correct=retriever_correct,
            reader_correct=reader_correct,
            block_idx=predicted_block_index,
            candidate=predicted_candidate,
            start_pos=predicted_start,
            end_pos=predicted_end,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        head_mask: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        relevance_score: torch.FloatTensor | None = None,
        block_mask: torch.BoolTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        has_answers: torch.BoolTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple | RealmReaderOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(reader_beam_size, sequence_length)`):
                `[CLS] question [SEP] block [SEP]` for the blocks read.
            relevance_score (`torch.FloatTensor` of shape `(searcher_beam_size,)`):
                Retrieval logits of the searched blocks (the first ones are those read).
            block_mask (`torch.BoolTensor` of shape `(searcher_beam_size, sequence_length)`):
                True on the evidence-block tokens, where answer spans may lie.
            start_positions / end_positions (`torch.LongTensor` of shape `(searcher_beam_size, num_answers)`, *optional*):
                Gold span positions per block, -1 for none.
            has_answers (`torch.BoolTensor` of shape `(searcher_beam_size,)`, *optional*):
                Whether each searched block contains an answer.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds.")
        self._check_reader_inputs(
            ref.shape[0], ref.shape[1], relevance_score, block_mask, start_positions, end_positions, has_answers
        )
        outputs = self._encode(
            self.realm,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            head_mask,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
        )
        output = self._read(
            outputs.last_hidden_state, relevance_score, block_mask, start_positions, end_positions, has_answers
        )
        output.hidden_states = outputs.hidden_states
        output.attentions = outputs.attentions
        return _return(output, return_dict, self.config)


class RealmForOpenQA(RealmPreTrainedModel):
    r"""
    `RealmForOpenQA` for end-to-end open-domain question answering: embed the question, search the cached block
    embeddings (`block_emb`), tokenize question + retrieved blocks with the [`RealmRetriever`], read answer spans.

    Args:
        config ([`RealmConfig`]): Model configuration.
        retriever ([`RealmRetriever`], *optional*):
            Holds the block texts and the tokenizer; required by `forward`.
        index ([`~hf_realm.retrieval.BlockIndex`], *optional*):
            The corpus index to search instead of the `block_emb` buffer (4.x kept all 13.35M block embeddings,
            6.8 GB, inside the model): a [`RealmBlockIndex`], or any object with the members of the
            [`~hf_realm.retrieval.BlockIndex`] protocol (`num_blocks`, `dim`, `embeddings`, `search`). Its cached
            embeddings are the frozen doc side (ORQA): gradients reach the query embedder only. Build the model with
            `num_block_records=0` to leave the buffer empty. Its blocks must be the retriever's block records, row for
            row (a different count is an error).
        doc_embedder ([`RealmEmbedder`], *optional*):
            A trainable doc tower (REALM trains it, ORQA keeps it frozen). In training mode the relevance scores of the
            `searcher_beam_size` retrieved blocks are computed with it from the index's block tokens
            (`index.block_inputs`), so the retriever loss reaches it; the search itself still runs over the index's
            cached embeddings, which [`IndexRefreshCallback`] re-embeds with it (it picks `doc_embedder` over
            `embedder`). In eval mode the index's embeddings are used as without it. Needs an index with
            `block_inputs` (a [`RealmBlockIndex`]). `save_pretrained` also writes it to `doc_embedder/`; a
            `RealmForOpenQA` loaded without one ignores its weights.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from hf_realm import RealmConfig, RealmForOpenQA, RealmRetriever, RealmTokenizer
    >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "wrote", "hamlet", "shakespeare", "did", "?"]
    >>> tokenizer = RealmTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    >>> retriever = RealmRetriever(np.array([b"shakespeare wrote hamlet", b"who did ?"], dtype=object), tokenizer)
    >>> config = RealmConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, num_block_records=2, reader_beam_size=1, searcher_beam_size=2,
    ...                      max_span_width=2, retriever_proj_size=8)
    >>> model = RealmForOpenQA(config, retriever=retriever).eval()
    >>> with torch.no_grad():
    ...     _ = model.block_emb.normal_()
    >>> out = model(**tokenizer(["who wrote hamlet ?"], return_tensors="pt"))
    >>> out.predicted_answer_ids.dim()
    1
    ```
    """

    _tied_weights_keys = {
        "embedder.cls.predictions.decoder.bias": "embedder.cls.predictions.bias",
        "reader.cls.predictions.decoder.bias": "reader.cls.predictions.bias",
    }
    # a trainable doc tower is saved with the model (so Trainer resumes it) and in `doc_embedder/`
    _keys_to_ignore_on_load_unexpected = RealmPreTrainedModel._keys_to_ignore_on_load_unexpected + [r"^doc_embedder\."]

    def __init__(self, config: RealmConfig, retriever=None, index=None, doc_embedder: RealmEmbedder | None = None):
        super().__init__(config)
        self.embedder = RealmEmbedder(config)
        self.reader = RealmReader(config)
        self.register_buffer(
            "block_emb",
            torch.zeros(()).new_empty(
                size=(config.num_block_records, config.retriever_proj_size),
                dtype=torch.float32,
                device=torch.device("cpu"),
            ),
        )
        if doc_embedder is not None:  # before post_init, which gathers its tied weights
            self.doc_embedder = doc_embedder
        self.retriever = retriever
        self.index = index
        self.post_init()

    @property
    def trainable_doc_embedder(self) -> RealmEmbedder | None:
        """The trainable doc tower (`doc_embedder` argument), or `None` (ORQA: the index's embeddings are frozen)."""
        return self._modules.get("doc_embedder")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model; with a trainable doc tower also that tower alone in `doc_embedder/` (a loadable
        [`RealmEmbedder`], e.g. to re-embed the corpus with `build_index.py`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        doc_embedder = self.trainable_doc_embedder
        if doc_embedder is not None and kwargs.get("is_main_process", True):
            doc_embedder.save_pretrained(os.path.join(str(save_directory), "doc_embedder"), safe_serialization=True)

    def _fresh_block_embeddings(self, block_ids: torch.Tensor, device) -> torch.Tensor:
        """`(batch, k, proj)` embeddings of the retrieved blocks by the trainable doc tower, with gradient."""
        block_inputs = getattr(self.index, "block_inputs", None)
        if block_inputs is None:
            raise ValueError(
                "a trainable doc_embedder re-embeds the retrieved blocks from the index's block tokens: expected an "
                f"index with `block_inputs` (RealmBlockIndex), got {type(self.index).__name__}"
            )
        inputs = block_inputs(block_ids.cpu(), pad_token_id=self.retriever.tokenizer.pad_token_id, device=device)
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in inputs.items()}
        emb = self.trainable_doc_embedder(**flat, return_dict=True).projected_score
        return emb.view(*block_ids.shape, -1)

    @property
    def searcher_beam_size(self) -> int:
        return self.config.searcher_beam_size if self.training else self.config.reader_beam_size

    @property
    def index(self) -> BlockIndex | None:
        """The corpus index searched instead of `block_emb` (see the class docstring)."""
        return self.__dict__.get("_block_index")

    @index.setter
    def index(self, index: BlockIndex | None) -> None:
        if index is not None and not isinstance(index, BlockIndex):
            raise TypeError(
                f"RealmForOpenQA's index must implement hf_realm.retrieval.BlockIndex; {type(index).__name__} lacks "
                f"{missing_members(index, BlockIndex)}"
            )
        self.__dict__["_block_index"] = index

    @property
    def num_blocks(self) -> int:
        """Blocks that retrieval chooses from: the index's, else the rows of `block_emb`."""
        return self.index.num_blocks if self.index is not None else self.block_emb.shape[0]

    def get_input_embeddings(self):
        return self.reader.get_input_embeddings()

    def block_embedding_to(self, device):
        """Send `self.block_emb` to a specific device (4.x API)."""
        self.block_emb = self.block_emb.to(device)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            init.zeros_(self.block_emb)

    def search_blocks(
        self, question_projection: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top `k` (default `searcher_beam_size`) block ids per question, and the (frozen) block embeddings.

        Raises:
            `ValueError` when ``k`` exceeds the number of blocks, and when the index returns an id outside
            ``[0, num_blocks)`` (``-1``: an approximate index found fewer than ``k`` blocks), instead of reading a wrong
            block.
        """
        k = self.searcher_beam_size if k is None else k
        num_blocks = self.num_blocks
        if num_blocks == 0:
            raise ValueError(
                "RealmForOpenQA has no block embeddings to search: num_block_records=0 and no index. Pass "
                "`index=RealmBlockIndex...` (or set `model.index`)."
            )
        if not 1 <= k <= num_blocks:
            which = "searcher_beam_size" if self.training else "reader_beam_size (the searcher beam in eval mode)"
            raise ValueError(
                f"cannot retrieve {k} blocks per question from {num_blocks} blocks: expected k <= {num_blocks}, got "
                f"k={k} (config.{which}); lower it or index more blocks"
            )
        if self.index is not None:
            with torch.no_grad():
                _, ids = self.index.search(question_projection.detach().float(), k)
            ids = torch.as_tensor(ids).cpu()
            expected = (question_projection.shape[0], k)
            if tuple(ids.shape) != expected:
                raise ValueError(f"the index returned block ids of shape {tuple(ids.shape)}, expected {expected}")
            bad = (ids < 0) | (ids >= num_blocks)
            if bool(bad.any()):
                row = int(bad.any(1).nonzero()[0])
                raise ValueError(
                    f"the index returned invalid block ids for question {row}: expected {k} ids in [0, {num_blocks}), "
                    f"got {ids[row].tolist()} (-1: an approximate index found fewer than {k} blocks; raise its nprobe "
                    "/ efSearch or use an exact backend)"
                )
            return ids, self.index.embeddings
        # Search runs where `block_emb` lives (the CPU by default, as in 4.x).
        batch_scores = question_projection.to(self.block_emb.device) @ self.block_emb.T
        _, retrieved_block_ids = torch.topk(batch_scores, k=k, dim=-1)
        return retrieved_block_ids, self.block_emb

    def _split_answers(self, answer_ids, batch_size: int):
        """4.x takes one question's answers `[[ids], ...]`; a batch takes one such list per question."""
        if answer_ids is None:
            return [None] * batch_size
        if isinstance(answer_ids, torch.Tensor):
            answer_ids = answer_ids.tolist()
        if not all(isinstance(a, (list, tuple, torch.Tensor)) for a in answer_ids):
            raise ValueError(f"answer_ids must hold lists of token ids (one list per answer), got {answer_ids!r}")
        # `[[]]` is one question with one empty answer (4.x form): wrapped, then refused below
        if batch_size == 1 and (
            not answer_ids or not answer_ids[0] or not isinstance(answer_ids[0][0], (list, tuple))
        ):
            answer_ids = [answer_ids]
        if len(answer_ids) != batch_size:
            raise ValueError(
                f"answer_ids must hold one list of answers per question (batch size {batch_size}), got "
                f"{len(answer_ids)}"
            )
        for i, answers in enumerate(answer_ids):
            if len(answers) == 0 or any(len(a) == 0 for a in answers):
                raise ValueError(f"question {i}: answer_ids holds an empty answer list or an empty answer")
        return answer_ids

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.FloatTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        answer_ids: torch.LongTensor | list | None = None,
        return_dict: bool | None = None,
    ) -> tuple | RealmForOpenQAOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Tokenized questions (`[CLS] question [SEP]`).
            answer_ids (`list` of shape `(num_answers, answer_length)`, *optional*):
                Answer ids of one question (4.x), or with `batch_size > 1` a list holding one such list per question.

        Returns:
            [`RealmForOpenQAOutput`]; `return_dict=False` gives `(reader_output, predicted_answer_ids)` as in 4.x.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.retriever is None:
            raise ValueError(
                "RealmForOpenQA needs a retriever: RealmForOpenQA.from_pretrained(path, retriever=RealmRetriever...)"
            )
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch_size, sequence_length), got "
                f"{None if input_ids is None else tuple(input_ids.shape)}"
            )
        num_records = len(self.retriever.block_records)
        if num_records != self.num_blocks and self.num_blocks > 0:  # no blocks at all: `search_blocks` says so
            source = "the index" if self.index is not None else "block_emb (config.num_block_records)"
            raise ValueError(
                f"the retriever holds {num_records} block records but {source} holds {self.num_blocks} blocks: "
                "expected the same corpus, row for row"
            )
        check_tokenizer_fits(self.retriever.tokenizer, self.config, "the retriever's tokenizer")
        check_token_ids_fit(input_ids, self.config)
        batch_size = input_ids.shape[0]
        answers = self._split_answers(answer_ids, batch_size)
        lengths = (
            attention_mask.sum(-1) if attention_mask is not None else torch.full((batch_size,), input_ids.shape[1])
        )
        room = self.config.reader_seq_len - self.config.max_span_width - 1
        if int(lengths.max()) > room:
            raise ValueError(
                f"a question has {int(lengths.max())} tokens; the reader reads question and block together in "
                f"reader_seq_len={self.config.reader_seq_len} tokens, so questions may have at most {room} "
                f"(truncate them, e.g. DataCollatorForOpenQA(max_question_length=...))"
            )

        question_projection = self.embedder(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, return_dict=True
        ).projected_score
        retrieved_block_ids, block_embeddings = self.search_blocks(question_projection)
        fresh = None
        if self.training and self.trainable_doc_embedder is not None:
            fresh = self._fresh_block_embeddings(retrieved_block_ids, question_projection.device)

        device = self.reader.device
        reader_beam = min(self.config.reader_beam_size, self.searcher_beam_size)
        per_question = []
        for b in range(batch_size):
            ids_b = retrieved_block_ids[b]
            has_answers, start_pos, end_pos, concat = self.retriever(
                ids_b.cpu(), input_ids[b : b + 1], answers[b], max_length=self.config.reader_seq_len
            )
            block_mask = concat.special_tokens_mask.to(torch.bool).logical_not() & concat.token_type_ids.to(torch.bool)
            # A short question whose blocks are all short (a one-word block) reads fewer than max_span_width tokens;
            # the reader enumerates spans up to max_span_width, so such a question is read padded to that length
            # (the padding is outside the block mask, so no span lies in it).
            length = max(concat.input_ids.shape[1], self.config.max_span_width)
            block_mask = nn.functional.pad(block_mask, (0, length - block_mask.shape[1]), value=False)
            if fresh is not None:
                relevance = question_projection[b] @ fresh[b].to(question_projection.dtype).T
            else:
                relevance = (
                    question_projection[b]
                    @ block_embeddings[ids_b.to(block_embeddings.device)].to(question_projection.device).T
                )
            per_question.append((concat, length, block_mask, relevance, has_answers, start_pos, end_pos))

        # One reader pass over every question's blocks, padded to the longest; each question's spans are then read
        # over its own length, so the answers equal those of one-by-one calls.
        max_len = max(q[1] for q in per_question)
        pad_id = self.retriever.tokenizer.pad_token_id

        def pad(t, value):
            return nn.functional.pad(t[:reader_beam], (0, max_len - t.shape[1]), value=value)

        joint = {
            "input_ids": torch.cat([pad(q[0].input_ids, pad_id) for q in per_question]).to(device),
            "attention_mask": torch.cat([pad(q[0].attention_mask, 0) for q in per_question]).to(device),
            "token_type_ids": torch.cat([pad(q[0].token_type_ids, 0) for q in per_question]).to(device),
        }
        sequence_output = self.reader.encode(**joint).last_hidden_state

        outputs, predicted, spans = [], [], []
        for b, (concat, length, block_mask, relevance, has_answers, start_pos, end_pos) in enumerate(per_question):
            if has_answers is not None:
                has_answers = torch.tensor(has_answers, dtype=torch.bool, device=device)
                start_pos = torch.tensor(start_pos, dtype=torch.long, device=device)
                end_pos = torch.tensor(end_pos, dtype=torch.long, device=device)
            out = self.reader.read_spans(
                sequence_output[b * reader_beam : (b + 1) * reader_beam, :length],
                relevance.to(device),
                block_mask.to(device),
                start_pos,
                end_pos,
                has_answers,
            )
            block = concat.input_ids[out.block_idx]
            predicted.append(block[out.start_pos : out.end_pos + 1].to(device))  # on the reader's device, as in 4.x
            first_block_token = int(block_mask[out.block_idx].to(torch.int8).argmax())  # spans lie in the block
            spans.append((int(retrieved_block_ids[b][out.block_idx]), int(out.start_pos) - first_block_token,
                          int(out.end_pos) - first_block_token))  # fmt: skip
            outputs.append(out)

        if batch_size == 1:
            reader_output, predicted_answer_ids = outputs[0], predicted[0]
        else:
            reader_output, predicted_answer_ids = _stack_reader_outputs(outputs), predicted
        if not return_dict:
            return reader_output, predicted_answer_ids
        return RealmForOpenQAOutput(
            loss=reader_output.loss,
            reader_output=reader_output,
            predicted_answer_ids=predicted_answer_ids,
            predicted_answer_spans=spans,
        )


def _stack_reader_outputs(outputs: list[RealmReaderOutput]) -> RealmReaderOutput:
    first = outputs[0]
    if first.loss is None:
        losses = {}
    else:
        losses = {
            "loss": torch.stack([o.loss for o in outputs]).mean(),
            "retriever_loss": torch.stack([o.retriever_loss for o in outputs]),
            "reader_loss": torch.stack([o.reader_loss for o in outputs]),
            "retriever_correct": torch.stack([o.retriever_correct for o in outputs]),
            "reader_correct": tuple(o.reader_correct for o in outputs),
        }
    return RealmReaderOutput(
        **losses,
        block_idx=torch.stack([o.block_idx for o in outputs]),
        candidate=torch.stack([o.candidate for o in outputs]),
        start_pos=torch.cat([o.start_pos for o in outputs]),
        end_pos=torch.cat([o.end_pos for o in outputs]),
    )


# ------------------------------------------------------------------------------------------------------------------
# Pretraining: REALM's end-to-end masked LM with retrieval, and the ICT warm start of the retriever
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class RealmForMaskedLMOutput(ModelOutput):
    """
    Outputs of [`RealmForMaskedLM`]. `M` is the number of masked (labelled) positions in the batch.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `-mean_m log sum_k p(z_k|x) p(y_m|z_k,x)` over the labelled positions (returned with `labels`).
        logits (`torch.FloatTensor` of shape `(M, vocab_size)`):
            Marginal log-probabilities `log p(y_m = v | x)` at the masked positions, in row-major order of `labels`.
        null_logits (`torch.FloatTensor` of shape `(M, vocab_size)`):
            Log-probabilities with the null document alone (closed book), `log p(y_m = v | null, x)`.
        retrieval_logits (`torch.FloatTensor` of shape `(batch_size, num_candidates)`):
            Relevance scores `Embed_input(x) . Embed_doc(z)` of the candidates (the null document scores 0).
        retrieved_block_ids (`torch.LongTensor` of shape `(batch_size, num_candidates)`):
            Block ids of the candidates; -1 for the null document (candidate 0).
        masked_positions (`torch.LongTensor` of shape `(M, 2)`):
            `(example, position)` of every labelled position.
        gold_log_probs (`torch.FloatTensor` of shape `(M,)`, *optional*):
            `log p(y_m | x)` of the label, with retrieval.
        null_gold_log_probs (`torch.FloatTensor` of shape `(M,)`, *optional*):
            `log p(y_m | null, x)` of the label (retrieval utility = `gold_log_probs - null_gold_log_probs`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    null_logits: torch.FloatTensor | None = None
    retrieval_logits: torch.FloatTensor | None = None
    retrieved_block_ids: torch.LongTensor | None = None
    masked_positions: torch.LongTensor | None = None
    gold_log_probs: torch.FloatTensor | None = None
    null_gold_log_probs: torch.FloatTensor | None = None


class RealmForMaskedLM(_QueryEmbedderMixin, RealmPreTrainedModel):
    r"""
    REALM pretraining, end to end: embed the masked query, retrieve the top blocks from the corpus index (MIPS over
    cached doc embeddings), drop the query's own source block (trivial retrieval), put the null document at
    candidate 0, re-embed the candidates with the current doc embedder (so both towers get gradients), run the
    knowledge-augmented encoder on `[CLS] x [SEP] z [SEP]` and return the marginal log-likelihood over the masked
    positions. MLM logits are computed only at masked positions.

    The index is given at construction, as RAG's model is given its retriever, and may be swapped at any time
    (`model.index = new_index`, what [`IndexRefreshCallback`] does). Any object with these two methods works:

    - `search(query_embeddings: FloatTensor (B, proj), k: int) -> (scores (B, k), block_ids LongTensor (B, k))`,
      best first;
    - `block_inputs(block_ids: LongTensor (n,)) -> dict` of right-padded `input_ids`, `attention_mask` and
      `token_type_ids`, `(n, length)`: each block as the doc embedder reads it, `[CLS] title [SEP] body [SEP]`.

    [`RealmBlockIndex`] is such an index.

    Args:
        config ([`RealmConfig`]): `num_candidates` is k, the null document included (REALM: 8).
        index (*optional*): The corpus index (see above); required by `forward`.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmForMaskedLM
    >>> blocks = torch.tensor([[2, 10 + i, 11 + i, 3, 20 + i, 3] for i in range(6)])  # [CLS] title [SEP] body [SEP]
    >>> class TinyIndex:  # exact MIPS over embeddings computed once
    ...     def __init__(self, embedder):
    ...         with torch.no_grad():
    ...             self.emb = embedder(blocks).projected_score
    ...     def search(self, q, k):
    ...         return (q @ self.emb.T).topk(k)
    ...     def block_inputs(self, ids):
    ...         ids = blocks[ids]
    ...         return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16, num_candidates=3)
    >>> model = RealmForMaskedLM(config)
    >>> model.index = TinyIndex(model.embedder)
    >>> labels = torch.tensor([[-100, -100, 21, -100]])
    >>> out = model(torch.tensor([[2, 40, 4, 3]]), labels=labels, source_block_id=torch.tensor([1]))
    >>> out.retrieved_block_ids[0, 0].item(), 1 in out.retrieved_block_ids[0].tolist()
    (-1, False)
    ```
    """

    # the loss is a mean over masked positions already: Trainer must not rescale it by `num_items_in_batch` (which it
    # would, times the number of processes under DDP, for a forward that takes **kwargs)
    accepts_loss_kwargs = False

    _tied_weights_keys = {
        "embedder.cls.predictions.decoder.bias": "embedder.cls.predictions.bias",
        "encoder.cls.predictions.decoder.weight": "encoder.realm.embeddings.word_embeddings.weight",
        "encoder.cls.predictions.decoder.bias": "encoder.cls.predictions.bias",
    }

    def __init__(self, config: RealmConfig, index=None):
        super().__init__(config)
        if config.num_candidates < 2:
            raise ValueError(
                f"num_candidates must be >= 2 (the null document plus at least one retrieved block), got "
                f"{config.num_candidates}"
            )
        self.embedder = RealmEmbedder(config)
        if not config.share_embedders:
            self.query_embedder = RealmEmbedder(config)
        self.encoder = RealmKnowledgeAugEncoder(config)
        self.index = index
        self.post_init()

    def save_pretrained(self, save_directory, *args, save_index: bool = True, **kwargs):
        """Save the whole model, each sub-model in its own loadable folder (`embedder/`, `query_embedder/` when
        separate, `encoder/`), and the index (`index/`) when it has `save_pretrained` and `save_index` is true."""
        super().save_pretrained(save_directory, *args, **kwargs)
        main = kwargs.get("is_main_process", True)
        if not main:
            return
        subs = {"embedder": self.embedder, "encoder": self.encoder}
        if not self.config.share_embedders:
            subs["query_embedder"] = self.query_embedder
        for name, module in subs.items():
            module.save_pretrained(os.path.join(str(save_directory), name), safe_serialization=True)
        if save_index and self.index is not None and hasattr(self.index, "save_pretrained"):
            self.index.save_pretrained(os.path.join(str(save_directory), "index"))

    def _candidates(self, query_embeddings, source_block_id):
        """Top `num_candidates - 1` block ids per query from the index, the query's own source block removed."""
        if self.index is None:
            raise ValueError(
                "RealmForMaskedLM needs a corpus index: RealmForMaskedLM(config, index=...) or `model.index = ...`"
            )
        num_retrieved = self.config.num_candidates - 1
        extra = 0 if source_block_id is None else 1
        with torch.no_grad():
            _, ids = self.index.search(query_embeddings.detach().float(), num_retrieved + extra)
        ids = torch.as_tensor(ids, device=query_embeddings.device).long()
        if ids.shape[1] < num_retrieved + extra:
            raise ValueError(
                f"the index returned {ids.shape[1]} blocks per query, need {num_retrieved + extra} "
                f"(num_candidates - 1{' + 1 for the dropped source block' if extra else ''}): is the corpus smaller?"
            )
        if source_block_id is None:
            return ids
        source = source_block_id.to(ids.device).view(-1, 1)
        keep = ids != source
        # Where the source block was not retrieved, drop the last retrieved block instead.
        keep[:, -1] &= ~keep[:, :-1].all(dim=1)
        return ids[keep].view(ids.shape[0], num_retrieved)

    def _embed_blocks(self, block_ids: torch.Tensor):
        """Re-embed the candidates with the current doc embedder (this is where the doc tower gets its gradient)."""
        inputs = self.index.block_inputs(block_ids.reshape(-1).cpu())
        inputs = {k: torch.as_tensor(v).to(block_ids.device) for k, v in inputs.items()}
        emb = self.embedder(**inputs, return_dict=True).projected_score
        mask = inputs["attention_mask"].bool()
        token_ids = [row[m].tolist() for row, m in zip(inputs["input_ids"], mask, strict=True)]
        return emb.view(*block_ids.shape, -1), token_ids

    def _joint_inputs(self, input_ids, attention_mask, block_token_ids, num_queries):
        """`[CLS] x [SEP] z [SEP]` for every query and candidate (candidate 0: the null document, x alone)."""
        k = self.config.num_candidates
        rows = []
        for b in range(num_queries):
            x = input_ids[b][attention_mask[b].bool()].tolist()
            for c in range(k):
                rows.append((x, [] if c == 0 else block_token_ids[b * (k - 1) + c - 1][1:]))
        return self._pack_pairs(rows, input_ids.device)

    def _pack_pairs(self, rows, device):
        """Right-padded `input_ids` / `attention_mask` / `token_type_ids` of `x + z` pairs (`z` cut to fit the reader's
        positions; `z` gets token type 1)."""
        max_len = self.config.max_position_embeddings
        rows = [(x, z[: max(0, max_len - len(x))]) for x, z in rows]
        length = max(len(x) + len(z) for x, z in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        types = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (x, z) in enumerate(rows):
            ids[i, : len(x) + len(z)] = torch.as_tensor(x + z)
            mask[i, : len(x) + len(z)] = 1
            types[i, len(x) : len(x) + len(z)] = 1
        return ids.to(device), mask.to(device), types.to(device)

    def reader_mlm_loss(self, input_ids, attention_mask, labels, block_ids) -> torch.Tensor:
        """The knowledge-augmented encoder's MLM loss with ONE given block per query (no retrieval, no null document):
        mean cross-entropy over the masked positions of `[CLS] x [SEP] z [SEP]`. Used to warm-start the reader
        ([`~hf_realm.pretraining.train_reader_warm_start`]).

        Args:
            input_ids, attention_mask, labels (`torch.LongTensor` of shape `(batch_size, query_length)`): The masked
                queries and their MLM labels (-100 where not masked).
            block_ids (`torch.LongTensor` of shape `(batch_size,)`): The block each query reads (from `self.index`).
        """
        if self.index is None:
            raise ValueError("reader_mlm_loss reads blocks from the model's index: set `model.index` first")
        block_ids = torch.as_tensor(block_ids).reshape(-1)
        if block_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"block_ids must hold one block per query ({input_ids.shape[0]}), got {block_ids.shape[0]}"
            )
        blocks = self.index.block_inputs(block_ids.cpu())
        rows = []
        for b in range(input_ids.shape[0]):
            z = blocks["input_ids"][b][blocks["attention_mask"][b].bool()].tolist()
            rows.append((input_ids[b][attention_mask[b].bool()].tolist(), z[1:]))
        joint_ids, joint_mask, joint_types = self._pack_pairs(rows, input_ids.device)
        hidden = self.encoder.realm(
            input_ids=joint_ids, attention_mask=joint_mask, token_type_ids=joint_types, return_dict=True
        ).last_hidden_state
        positions = torch.nonzero(labels != -100)
        if positions.shape[0] == 0:
            raise ValueError("labels hold no masked position (all -100): nothing to predict in this batch")
        logits = self.encoder.cls(hidden[positions[:, 0], positions[:, 1]]).float()
        return torch.nn.functional.cross_entropy(logits, labels[positions[:, 0], positions[:, 1]])

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        source_block_id: torch.LongTensor | None = None,
        gold_block_id: torch.LongTensor | None = None,
        candidate_block_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | RealmForMaskedLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`):
                The masked query `[CLS] x [SEP]` (right padded).
            labels (`torch.LongTensor` of shape `(batch_size, query_length)`, *optional*):
                Original ids at the masked positions, -100 elsewhere. Every batch needs at least one.
            source_block_id (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                The block each query was taken from (-1 for none), dropped from its candidates.
            gold_block_id (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Accepted and ignored here (the metrics use it); lets collators pass it through.
            candidate_block_ids (`torch.LongTensor` of shape `(batch_size, num_candidates - 1)`, *optional*):
                Use these blocks instead of searching the index.
        """
        unexpected = set(kwargs) - {"block_id", "num_items_in_batch"}
        if unexpected:
            raise TypeError(f"RealmForMaskedLM.forward got unexpected arguments {sorted(unexpected)}")
        if source_block_id is None:
            source_block_id = kwargs.get("block_id")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size, query_length = input_ids.shape
        k = self.config.num_candidates
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            if not (labels != -100).any():
                raise ValueError("labels hold no masked position (all -100): nothing to predict in this batch")
            if ((labels != -100) & ~attention_mask.bool()).any():
                raise ValueError("labels mark a masked position outside the query (where attention_mask is 0)")

        query = self.query_embedder(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        ).projected_score
        if candidate_block_ids is None:
            candidate_block_ids = self._candidates(query, source_block_id)
        elif tuple(candidate_block_ids.shape) != (batch_size, k - 1):
            raise ValueError(
                f"candidate_block_ids must have shape (batch_size={batch_size}, num_candidates - 1={k - 1}), got "
                f"{tuple(candidate_block_ids.shape)}"
            )
        doc, block_token_ids = self._embed_blocks(candidate_block_ids)
        retrieval_logits = torch.cat([query.new_zeros(batch_size, 1), torch.einsum("bd,bkd->bk", query, doc)], dim=1)
        retrieved = torch.cat([candidate_block_ids.new_full((batch_size, 1), -1), candidate_block_ids], dim=1)

        if labels is None:
            positions = torch.nonzero(input_ids == -1)  # no labels: no positions to score
        else:
            positions = torch.nonzero(labels != -100)  # (M, 2), row-major
        output = RealmForMaskedLMOutput(
            retrieval_logits=retrieval_logits, retrieved_block_ids=retrieved, masked_positions=positions
        )
        if positions.shape[0] > 0:
            joint_ids, joint_mask, joint_types = self._joint_inputs(
                input_ids, attention_mask, block_token_ids, batch_size
            )
            hidden = self.encoder.realm(
                input_ids=joint_ids, attention_mask=joint_mask, token_type_ids=joint_types, return_dict=True
            ).last_hidden_state
            hidden = hidden.view(batch_size, k, hidden.shape[1], hidden.shape[2])
            # Only the masked positions go through the MLM head: (M, k, hidden) -> (M, k, vocab).
            masked_hidden = hidden[positions[:, 0], :, positions[:, 1]]
            token_log_probs = self.encoder.cls(masked_hidden).float().log_softmax(-1)
            doc_log_probs = retrieval_logits.float().log_softmax(-1)[positions[:, 0]]  # (M, k)
            output.logits = (doc_log_probs.unsqueeze(-1) + token_log_probs).logsumexp(1)
            output.null_logits = token_log_probs[:, 0]
            if labels is not None:
                gold = labels[positions[:, 0], positions[:, 1]]
                output.gold_log_probs = output.logits.gather(1, gold.unsqueeze(1)).squeeze(1)
                output.null_gold_log_probs = output.null_logits.gather(1, gold.unsqueeze(1)).squeeze(1)
                output.loss = -output.gold_log_probs.mean()
        return _return(output, return_dict, self.config)


@dataclass
class RealmForInverseClozeTaskOutput(ModelOutput):
    """
    Outputs of [`RealmForInverseClozeTask`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-entropy of each query against the in-batch blocks (its own block is the positive).
        logits (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            Query-block inner products.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class RealmForInverseClozeTask(_QueryEmbedderMixin, RealmPreTrainedModel):
    r"""
    The Inverse Cloze Task (ORQA) that warm-starts REALM's retriever: a sentence is the query, the block it came
    from (with the sentence removed) is the positive, the other blocks of the batch are the negatives.

    Example:

    ```python
    >>> import torch
    >>> from hf_realm import RealmConfig, RealmForInverseClozeTask
    >>> config = RealmConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, retriever_proj_size=16)
    >>> model = RealmForInverseClozeTask(config)
    >>> out = model(query_input_ids=torch.randint(5, 99, (4, 6)), block_input_ids=torch.randint(5, 99, (4, 12)))
    >>> out.logits.shape
    torch.Size([4, 4])
    ```
    """

    _tied_weights_keys = {"embedder.cls.predictions.decoder.bias": "embedder.cls.predictions.bias"}

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.embedder = RealmEmbedder(config)
        if not config.share_embedders:
            self.query_embedder = RealmEmbedder(config)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the model and its embedder(s) each in a loadable folder (`embedder/`, `query_embedder/`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.embedder.save_pretrained(os.path.join(str(save_directory), "embedder"))
            if not self.config.share_embedders:
                self.query_embedder.save_pretrained(os.path.join(str(save_directory), "query_embedder"))

    def forward(
        self,
        query_input_ids: torch.LongTensor,
        block_input_ids: torch.LongTensor,
        query_attention_mask: torch.LongTensor | None = None,
        query_token_type_ids: torch.LongTensor | None = None,
        block_attention_mask: torch.LongTensor | None = None,
        block_token_type_ids: torch.LongTensor | None = None,
        return_loss: bool = True,
        return_dict: bool | None = None,
    ) -> tuple | RealmForInverseClozeTaskOutput:
        r"""
        Args:
            query_input_ids (`torch.LongTensor` of shape `(batch_size, query_length)`): The sentences.
            block_input_ids (`torch.LongTensor` of shape `(batch_size, block_length)`):
                Their blocks (`[CLS] title [SEP] body [SEP]`, the sentence usually removed); row i is query i's positive.
        """
        if query_input_ids.shape[0] != block_input_ids.shape[0]:
            raise ValueError(
                f"one block per query: got {query_input_ids.shape[0]} queries and {block_input_ids.shape[0]} blocks"
            )
        query = self.query_embedder(
            query_input_ids, attention_mask=query_attention_mask, token_type_ids=query_token_type_ids, return_dict=True
        ).projected_score
        block = self.embedder(
            block_input_ids, attention_mask=block_attention_mask, token_type_ids=block_token_type_ids, return_dict=True
        ).projected_score
        logits = query @ block.T
        loss = None
        if return_loss:
            target = torch.arange(logits.shape[0], device=logits.device)
            loss = nn.functional.cross_entropy(logits.float(), target)
        return _return(RealmForInverseClozeTaskOutput(loss=loss, logits=logits), return_dict, self.config)


__all__ = [
    "RealmEmbedder",
    "RealmEmbedderOutput",
    "RealmForInverseClozeTask",
    "RealmForInverseClozeTaskOutput",
    "RealmForMaskedLM",
    "RealmForMaskedLMOutput",
    "RealmForOpenQA",
    "RealmForOpenQAOutput",
    "RealmKnowledgeAugEncoder",
    "RealmPreTrainedModel",
    "RealmReader",
    "RealmReaderOutput",
    "RealmScorer",
    "RealmScorerOutput",
]
