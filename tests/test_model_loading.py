"""Weight loading from HF safetensors directories, name resolution, and errors that name
what is wrong (GGUF: test_model_gguf.py). Logit tolerances as in test_model.py (fp32,
atol 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seqpar.model import ModelLoadError, load_model, resolve_model
from test_model_helpers import hf_logits, our_logits, packed_batch, save_tiny, tiny_hf_model

BATCH = dict(lengths=[6, 9, 4], starts=[0, 30, 0])


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


# ---- HF safetensors directories -----------------------------------------------------------


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    model, _ = load_model(tmp_path)
    batch = packed_batch(**BATCH)
    torch.testing.assert_close(our_logits(model, batch), hf_logits(hf, batch), atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_into_requested_dtype(tmp_path: Path) -> None:
    tiny_hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())


def test_generation_config_adds_eos_tokens(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    _, config = load_model(path)
    assert config.eos_token_ids == (2, 7)


def test_tied_checkpoint_may_carry_a_copy_of_lm_head(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama", tie_word_embeddings=True)
    _rewrite(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model, config = load_model(path)
    assert config.tie_word_embeddings and model.lm_head is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
            r"unexpected keys: model\.layers\.0\.extra\.weight",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(47)),
            r"wrong shapes: model\.norm\.weight \(47,\) \(expected \(48,\)\)",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(48, dtype=torch.int32)),
            r"non-float tensors: model\.norm\.weight torch\.int32",
        ),
    ],
)
def test_strict_loading_names_bad_keys(tmp_path: Path, edit, message: str) -> None:
    _, path = save_tiny(tmp_path, "llama")
    _rewrite(path, edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_lm_head_is_an_error_when_untied(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama")
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match=r"missing keys: lm_head\.weight"):
        load_model(path)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=rf"{file}: cannot read safetensors file \(truncated or corrupt"):
        load_model(path)


def test_unsupported_architecture_in_config_json(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config.json: unsupported config: .*'gpt_neox' is not supported"):
        load_model(path)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin: pickled .* convert to safetensors"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="convert to safetensors"):
        load_model(tmp_path / "pytorch_model.bin")


def test_unknown_name_and_empty_dir_say_what_would_work(tmp_path: Path) -> None:
    with pytest.raises(
        ModelLoadError,
        match=r"'llama-9000' is neither a known model name "
        r"\(smollm2-135m, .*\) nor an existing path; a path must",
    ):
        resolve_model("llama-9000")
    with pytest.raises(ModelLoadError, match=r"holds no model weights; .*config\.json and \*\.safetensors"):
        resolve_model(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(a\.gguf, b\.gguf\)"):
        resolve_model(tmp_path)
