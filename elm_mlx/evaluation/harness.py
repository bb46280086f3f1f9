"""The lm-evaluation-harness model backend, registered as `elm_mlx`.

Importing this module imports lm-eval (an optional extra); `elm_mlx.evaluation.lm_eval_module`
gives the install hint when it is missing. From Python:

    import elm_mlx.evaluation.harness  # registers "elm_mlx"
    lm_eval.simple_evaluate(model="elm_mlx", model_args="pretrained=./openelm-270m", ...)

Tokenization follows lm-eval's Hugging Face backend with `add_bos_token=True`
(how the model cards' numbers were made): the context is encoded alone and the
continuation is what encoding context + continuation adds after it; trailing
spaces of a context move to its continuation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import mlx.core as mx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..generation.batch import generate_many
from ..generation.generate import GenerationSettings
from ..generation.loading import load_for_generation
from ..runtime.fastpath import CpuDecoder
from . import scoring

# What lm-eval passes to every model it builds from a name; not used here.
_LM_EVAL_ARGS = {"device", "max_batch_size", "trust_remote_code"}


@register_model("elm_mlx")
class ElmLM(TemplateLM):
    """An elm_mlx model (float, quantized or with adapters) as an lm-eval `LM`.

    model_args: `pretrained` (a model directory or hub id; default the nano model),
    `adapter_path`, `batch_size` (sequences per forward pass), `add_bos_token` (true),
    `dtype` (auto), `max_gen_toks` (for tasks that set none), `rolling_stride` (tokens
    scored per window of `loglikelihood_rolling` after the first; default the context,
    lm-eval's disjoint windows), `progress`. From Python, `model=` and `tokenizer=` take
    a model already loaded.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        adapter_path: str | None = None,
        batch_size: int | str = 16,
        add_bos_token: bool | str = True,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        rolling_stride: int | None = None,
        model=None,
        tokenizer=None,
        progress: bool = True,
        **lm_eval_args,
    ):
        super().__init__()
        unknown = sorted(set(lm_eval_args) - _LM_EVAL_ARGS)
        if unknown:
            raise ValueError(f"unknown elm_mlx model argument(s): {', '.join(unknown)}")
        if model is None:
            model, tokenizer, _ = load_for_generation(
                pretrained, adapter_path=adapter_path, dtype=dtype
            )
        self.generator = model  # may be the CPU fast path, for generation
        self.model = model.model if isinstance(model, CpuDecoder) else model
        self.tokenizer = tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size", default=16)
        self.add_bos_token = _as_bool(add_bos_token, "add_bos_token")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks", default=256)
        self.rolling_stride = None if rolling_stride is None else int(rolling_stride)
        self.show_progress = _as_bool(progress, "progress")
        self.group = scoring.process_group()

    # ---- what TemplateLM asks for ---------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.args.max_context_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.model_file)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **_) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self.score(pairs, disable_tqdm=disable_tqdm)

    def score(self, pairs, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per (context ids, continuation ids), on every process."""
        with self._bar(len(pairs), disable_tqdm) as bar:
            return scoring.score(
                self.model, pairs, batch_size=self.batch_size, group=self.group, progress=bar.update
            )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            tokens = self.tokenizer.encode(text, bos=False)
            prefix = self.prefix_token_id if self.add_bos_token else self.eot_token_id
            for w in scoring.rolling_windows(tokens, prefix, self.max_length, self.rolling_stride):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        with self._bar(len(windows), disable_tqdm) as bar:
            scores = scoring.score_windows(
                self.generator, windows, batch_size=self.batch_size, group=self.group,
                progress=bar.update,
            )  # fmt: skip
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's text as `generate` alone gives it, `batch_size` requests per step."""
        rank, size = (0, 1) if self.group is None else (self.group.rank(), self.group.size())
        mine = list(range(rank, len(requests), size))
        asks = [self._generation(*requests[i].args) for i in mine]
        with self._bar(len(mine), disable_tqdm) as bar:
            out = generate_many(
                self.generator, self.tokenizer, [ids for ids, _ in asks], [s for _, s in asks],
                batch_size=self.batch_size, on_done=lambda _: bar.update(1),
            )  # fmt: skip
        texts = dict(zip(mine, out, strict=True))
        if size > 1:
            texts = _gather_texts(texts)
        return [texts[i] for i in range(len(requests))]

    def _generation(self, context: str, options: dict) -> tuple[list[int], GenerationSettings]:
        """Prompt ids and settings of one request, from lm-eval's generation options."""
        options = dict(options)
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(options.pop("max_gen_toks", self.max_gen_toks))
        temp = float(options.pop("temperature", 0.0) or 0.0)
        if not options.pop("do_sample", False):
            temp = 0.0
        ids = self.tok_encode(context)
        keep = max(1, self.max_length - max_new)
        ids = ids[-keep:]  # lm-eval's HF backend cuts long contexts from the left too
        settings = GenerationSettings(
            max_tokens=max_new, temp=temp, top_p=float(options.pop("top_p", 1.0) or 1.0),
            stop=tuple(s for s in until if s), seed=0 if temp > 0 else None,
        )  # fmt: skip
        return ids, settings

    def _bar(self, total: int, disable: bool):
        off = disable or not self.show_progress or (self.group is not None and self.group.rank())
        return tqdm(total=total, disable=bool(off), unit="req", dynamic_ncols=True)


def _gather_texts(texts: dict[int, str]) -> dict[int, str]:
    """Every process's generated texts in every process (JSON bytes, padded and summed)."""
    data = list(json.dumps(texts).encode("utf-8"))
    sizes = mx.distributed.all_gather(mx.array([len(data)]), stream=mx.cpu).tolist()
    width = max(sizes)
    rows = mx.distributed.all_gather(
        mx.array([data + [0] * (width - len(data))], dtype=mx.uint8), stream=mx.cpu
    ).tolist()
    out: dict[int, str] = {}
    for row, n in zip(rows, sizes, strict=True):
        out.update({int(k): v for k, v in json.loads(bytes(row[:n]).decode("utf-8")).items()})
    return out


def _positive_int(value, name: str, default: int) -> int:
    if value in (None, "", "auto"):
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return n


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
