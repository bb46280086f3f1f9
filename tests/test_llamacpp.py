"""llama.cpp runs our GGUF files: tokenization, logits and greedy text against elm_mlx.

Needs llama-cpp-python (`pip install 'elm-mlx[llamacpp]'`, which builds llama.cpp from
source); skipped without it. Each model is checked as shipped (the nano model) and as a
tiny random checkpoint whose layers differ in width.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from elm_mlx.formats.gguf import export_gguf  # noqa: E402
from elm_mlx.formats.modeldir import DEFAULT_MODEL, load_model  # noqa: E402
from elm_mlx.formats.tokenizer import Tokenizer  # noqa: E402
from elm_mlx.testing import random_weights, tiny_args, write_hf_checkpoint  # noqa: E402
from elm_mlx.training.finetune import load_fused  # noqa: E402

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\nlines\n\n",
    "many     inner      spaces",
    "héllo wörld, naïve café, déjà vu",
    "Ünïcödé ÀÉÎÕÜ ß ø å",
    "日本語のテキスト",  # byte fallback in both tokenizers
    "emoji 🙂🚀 and a flag 🇫🇷",
    "Numbers like 1234 and 5678.",
    "a\u00a0non-breaking space",
    "</s> control piece in text <s>",
    "",
    " ",
    "\n",
]
PROSE = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet "
    "is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale "
    "with grief that thou her maid art far more fair than she. Be not her maid, since she "
    "is envious; her vestal livery is but sick and green, and none but fools do wear it. "
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; "
    "or, if thou wilt not, be but sworn my love, and I'll no longer be a Capulet. "
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, sp_model_file) -> Path:
    """A tiny tied random checkpoint whose next-token distributions are peaked yet varied.

    N(0, 0.02) weights give near-uniform logits (argmax comparisons become coin flips), and
    a large embedding alone makes a tied model repeat its input token. So: embeddings x16,
    attention x4, FFN x2, and a final norm weight of either sign (no echo of the input).
    Larger factors make the random network chaotic, where any rounding (q8_0) flips tokens.
    """
    args = tiny_args(vocab_size=384, model_dim=64, head_dim=16)
    weights = random_weights(args, 12)
    for key, w in weights.items():
        if not key.endswith("norm.weight"):
            w *= 16 if "token_embeddings" in key else 4 if ".attn." in key else 2
    rng = np.random.default_rng(5)
    weights["transformer.norm.weight"] = rng.standard_normal(args.model_dim).astype(np.float32)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", args, weights)
    shutil.copyfile(sp_model_file, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module", params=["nano", "tiny"])
def model_dir(request, tiny_dir) -> Path:
    return DEFAULT_MODEL if request.param == "nano" else tiny_dir


_files: dict[tuple[Path, str], Path] = {}


def export_dir(src: Path, out: Path, *, adapter_path=None, **kw) -> Path:
    """A model directory exported as `elm-mlx export-gguf` does: adapters fused, de-quantized."""
    model, tokenizer = load_fused(src, adapter_path, de_quantize=True)
    return export_gguf(model, tokenizer, out, name=src.name, **kw)


def gguf_file(src: Path, type_name: str, tmp_root: Path) -> Path:
    key = (src, type_name)
    if key not in _files:
        _files[key] = export_dir(src, tmp_root / f"{src.name}-{type_name}.gguf",
                                 type_name=type_name, force=True)  # fmt: skip
    return _files[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def llama(file: Path, n_ctx: int):
    """llama.cpp on `file`, every position's logits kept, and a float32 KV cache (its default
    float16 cache would add rounding of its own to the comparison)."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=True, n_threads=1, seed=0, type_k=f32, type_v=f32,
                           verbose=False)  # fmt: skip


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def our_logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def prose_tokens(tokenizer: Tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROSE * 8)
    return ids[:n]


def test_same_tokenization(model_dir, tmp_root):
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    llm = llama(gguf_file(model_dir, "f32", tmp_root), 64)
    for text in TEXTS:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert theirs == ours, text


def test_f32_logits_within_1e3_relative(model_dir, tmp_root):
    model, args = load_model(model_dir)
    tokens = prose_tokens(Tokenizer(model_dir / "tokenizer.model"), 96)
    got = llama_logits(llama(gguf_file(model_dir, "f32", tmp_root), 128), tokens)
    want = our_logits(model, tokens)
    assert got.shape == want.shape == (len(tokens), args.vocab_size)
    scale = np.abs(want).max(axis=-1)  # per position
    err = np.abs(got - want).max(axis=-1)
    assert np.all(err <= 1e-3 * scale), float((err / scale).max())


def greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("type_name", ["f32", "f16"])
def test_greedy_64_tokens_equal(model_dir, tmp_root, type_name):
    model, _ = load_model(model_dir)
    prompt = prose_tokens(Tokenizer(model_dir / "tokenizer.model"), 24)
    want = greedy_ours(model, prompt, 64)
    got = greedy_llama(llama(gguf_file(model_dir, type_name, tmp_root), 128), prompt, 64)
    assert len(set(want)) >= 8  # varied text, not one token repeated
    assert got == want


def test_q8_0_top1_agreement(model_dir, tmp_root):
    model, _ = load_model(model_dir)
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    ids = tokenizer.encode(PROSE * 8, bos=False)
    llm = llama(gguf_file(model_dir, "q8_0", tmp_root), 256)
    agree = total = 0
    for start in (0, 200):  # two windows of 200 positions: 400 in all
        window = [tokenizer.bos_id] + ids[start : start + 199]
        ours = our_logits(model, window).argmax(-1)
        theirs = llama_logits(llm, window).argmax(-1)
        agree += int((ours == theirs).sum())
        total += len(window)
    assert total == 400
    assert agree / total >= 0.95, agree / total


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("type_name", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_4_and_5_bit_quality_on_the_nano_model(tmp_root, type_name):
    """llama.cpp's 4- and 5-bit block formats against elm_mlx's float32 logits, 400 positions:
    top-1 agreement and the KL divergence from the float32 next-token distribution."""
    model, _ = load_model(DEFAULT_MODEL)
    tokenizer = Tokenizer(DEFAULT_MODEL / "tokenizer.model")
    ids = tokenizer.encode(PROSE * 8, bos=False)
    llm = llama(gguf_file(DEFAULT_MODEL, type_name, tmp_root), 256)
    agree, kl = [], []
    for start in (0, 200):
        window = [tokenizer.bos_id] + ids[start : start + 199]
        ref, got = log_softmax(our_logits(model, window)), log_softmax(llama_logits(llm, window))
        agree.append((ref.argmax(-1) == got.argmax(-1)).mean())
        kl.append((np.exp(ref) * (ref - got)).sum(-1).mean())
    assert np.mean(agree) >= 0.93 and np.mean(kl) <= 0.01, (np.mean(agree), np.mean(kl))


def test_fused_adapters_match_unfused_lora(tmp_root, tmp_path):
    """An adapter fused on export gives llama.cpp the logits of the unfused LoRA model."""
    from elm_mlx.testing import random_adapters
    from elm_mlx.training.lora import LoRAConfig, load_adapters

    config = LoRAConfig(rank=4, scale=2.0, num_layers=3)
    random_adapters(DEFAULT_MODEL, tmp_path / "adapters", config, std=0.02, seed=3)
    file = export_dir(DEFAULT_MODEL, tmp_path / "fused.gguf", type_name="f32",
                      adapter_path=tmp_path / "adapters")  # fmt: skip
    unfused, _ = load_model(DEFAULT_MODEL)
    load_adapters(unfused, tmp_path / "adapters")  # LoRA layers kept, not fused
    tokens = prose_tokens(Tokenizer(DEFAULT_MODEL / "tokenizer.model"), 64)
    want = our_logits(unfused, tokens)
    got = llama_logits(llama(file, 64), tokens)
    base = our_logits(load_model(DEFAULT_MODEL)[0], tokens)
    assert np.abs(want - base).max() > 1e-2  # the adapters do change the model
    scale = np.abs(want).max(axis=-1)
    assert np.all(np.abs(got - want).max(axis=-1) <= 1e-3 * scale)


def test_chat_template_reaches_llama_cpp(tmp_path):
    """llama-cpp-python's chat formatter, fed the file's template, renders the prompt our
    tokenizer renders, and stops at EOS."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    file = export_dir(DEFAULT_MODEL, tmp_path / "instruct.gguf", chat_template=True)
    llm = llama(file, 64)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                    eos_token="</s>", bos_token="<s>")  # fmt: skip
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Why?")]
    messages = [{"role": role, "content": text} for role, text in turns]
    rendered = formatter(messages=messages)
    assert rendered.prompt == Tokenizer(DEFAULT_MODEL / "tokenizer.model").apply_chat_template(
        messages
    )
    assert rendered.stop == ["</s>"]


def test_same_tokenization_with_a_32000_piece_llama_style_tokenizer(tmp_path):
    """The Llama-2 tokenizer is gated; mistral-common ships a 32000-piece SentencePiece model
    of the same kind (BPE, byte fallback, dummy prefix)."""
    import importlib.util

    spec = importlib.util.find_spec("mistral_common")
    sp_file = None if spec is None else Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    if sp_file is None or not sp_file.is_file():
        pytest.skip("mistral-common not installed")
    args = tiny_args(vocab_size=32000, layers=2, model_dim=32, head_dim=16)
    path = write_hf_checkpoint(tmp_path / "m", args, random_weights(args, 0))
    shutil.copyfile(sp_file, path / "tokenizer.model")
    tokenizer = Tokenizer(path / "tokenizer.model")
    llm = llama(export_dir(path, tmp_path / "m.gguf"), 64)
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == (
            tokenizer.encode(text)
        ), text
