"""Model card, saving and (mocked) publishing of a student; translation pipeline in Transformers 5."""

import time
from unittest import mock

import pytest
import torch
import yaml

from hf_seqkd import DistillationMethod, EvaluationResult
from hf_seqkd.hub import make_model_card, push_student, save_student, translation_pipeline

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


TEACHER = "Helsinki-NLP/opus-mt-de-en"
ROWS = [
    EvaluationResult(model=TEACHER, params=74_410_496, bleu_greedy=30.14, bleu_beam=31.2, chrf_greedy=55.5,
                     sent_per_s_greedy_batched=10.0),
    EvaluationResult(model="opus-mt-de-en-seqkd-6-3", params=49_000_000, bleu_greedy=28.456, bleu_beam=29.013,
                     chrf_greedy=53.21, sent_per_s_greedy_batched=35.0, extra={"notes": "k=5"}),
]
SEQ_KD = DistillationMethod(target="teacher_target")


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_model_card_front_matter_and_body():
    card = make_model_card(
        teacher_name=TEACHER, method=SEQ_KD, hyperparameters={"teacher_beam": 5, "learning_rate": 3e-4,
                                                                "max_steps": 20000},
        results=ROWS, source_lang="de", target_lang="en", datasets=["wmt16"], license="cc-by-4.0",
        model_name="opus-mt-de-en-seqkd-6-3", extra_text="Trained on one GPU.", hub_model_id="me/opus-seqkd")
    meta, body = _front_matter(card)
    assert meta["language"] == ["de", "en"]
    assert meta["license"] == "cc-by-4.0"
    assert meta["base_model"] == TEACHER
    assert meta["datasets"] == ["wmt16"]
    assert meta["pipeline_tag"] == "translation"
    assert {"translation", "knowledge-distillation", "hf_seqkd", "sequence-level-kd"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    assert index["name"] == "opus-mt-de-en-seqkd-6-3"
    (result,) = index["results"]
    assert result["task"]["type"] == "translation"
    assert result["dataset"]["name"] == "wmt16" and result["dataset"]["split"] == "test"
    metrics = {(m["type"], m["name"]): m["value"] for m in result["metrics"]}
    assert metrics[("bleu", "BLEU (greedy)")] == pytest.approx(28.456)
    assert metrics[("bleu", "BLEU (beam search)")] == pytest.approx(29.013)
    assert metrics[("chrf", "chrF")] == pytest.approx(53.21)

    assert "# opus-mt-de-en-seqkd-6-3" in body
    assert "Sec. 3.2" in body  # the method is described
    assert "| teacher_beam | 5 |" in body and "| learning_rate | 0.0003 |" in body
    header = next(line for line in body.splitlines() if line.startswith("| Model"))
    for column in ("Parameters", "BLEU (greedy)", "BLEU (beam)", "chrF", "Sentences/s", "Speed-up", "notes"):
        assert column in header
    student_row = next(line for line in body.splitlines() if line.startswith("| opus-mt-de-en-seqkd-6-3"))
    for cell in ("49.0M", "28.46", "29.01", "53.21", "35.0", "3.50×", "k=5"):
        assert cell in student_row
    teacher_row = next(line for line in body.splitlines() if line.startswith(f"| {TEACHER}"))
    assert "74.4M" in teacher_row and "1.00×" in teacher_row
    assert 'AutoModelForSeq2SeqLM.from_pretrained("me/opus-seqkd")' in body
    assert 'pipeline("translation", model="me/opus-seqkd")' in body
    assert body.rstrip().endswith("```") and "Trained on one GPU." in body


def test_model_card_with_local_teacher_flat_results_and_no_license(tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    method = DistillationMethod(target="teacher_target", word_kd=True, sparsity=0.8)
    card = make_model_card(teacher_name=str(teacher_dir), method=method, hyperparameters={"sparsity": 0.8},
                           results=[EvaluationResult(model="student", bleu_beam=12.5, chrf_beam=40.0)],
                           source_lang="xx", target_lang="yy")
    meta, body = _front_matter(card)
    assert "license" not in meta and "base_model" not in meta  # a local path is no Hub id
    assert {"word-level-kd", "sequence-level-kd", "pruning"} <= set(meta["tags"])
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["value"]) for m in metrics] == [("bleu", 12.5), ("chrf", 40.0)]
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "custom"
    assert "Sec. 5.3" in body and "12.50" in body


def test_model_card_results_of_several_models():
    card = make_model_card(teacher_name=TEACHER, method=DistillationMethod(target="seq_inter_target"),
                           hyperparameters={},
                           results=[EvaluationResult(model=TEACHER, bleu_greedy=30.0),
                                    EvaluationResult(model="student", bleu_greedy=27.0)],
                           source_lang="de", target_lang="en", model_name="student")
    meta, body = _front_matter(card)
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 27.0  # the student's, not the teacher's
    assert "sequence-level-interpolation" in meta["tags"]
    assert "| student | 27.00 |" in body


def test_save_student_loads_and_translates(tiny_marian, tokenizer, tmp_path):
    import transformers
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    card = make_model_card(teacher_name=TEACHER, method=SEQ_KD, hyperparameters={}, results=ROWS,
                           source_lang="de", target_lang="en")
    out = save_student(tiny_marian, tokenizer, tmp_path / "student", card)
    assert (out / "README.md").read_text(encoding="utf-8") == card
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == tokenizer.pad_token_id and len(tok) == len(tokenizer)
    for name, p in tiny_marian.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name

    sources = ["tipri lomi delzorgun privo", "gunha hapri deltu tumeklo"]
    with torch.no_grad():
        ids = model.generate(**tok(sources, return_tensors="pt", padding=True), max_new_tokens=8)
    expected = tok.batch_decode(ids, skip_special_tokens=True)
    translator = translation_pipeline(str(out), device="cpu")
    got = translator(sources, max_new_tokens=8)
    assert [g["translation_text"] for g in got] == expected
    assert translator(sources[0], max_new_tokens=8) == [{"translation_text": expected[0]}]
    batched = translator(sources, max_new_tokens=8, batch_size=2)
    assert [g["translation_text"] for g in batched] == expected
    # Transformers' own task: works in 4.x; 5.x removed it with a KeyError (hence translation_pipeline)
    try:
        native = transformers.pipeline("translation", model=str(out), tokenizer=str(out), device="cpu")
    except KeyError as err:
        assert "removed" in str(err)
    else:  # pragma: no cover - Transformers 4.x
        assert [g["translation_text"] for g in native(sources, max_new_tokens=8)] == expected


def test_save_student_writes_exact_zeros_of_a_pruned_model(tiny_marian, tokenizer, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from hf_seqkd.pruning import prune_model, pruning_masks

    masks = prune_model(tiny_marian, sparsity=0.5)
    with torch.no_grad():  # simulate drift at pruned positions (e.g. a stale optimizer)
        tiny_marian.model.shared.weight.add_(1e-3)
    save_student(tiny_marian, tokenizer, tmp_path / "pruned")
    assert pruning_masks(tiny_marian)  # masks stay active
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned")
    assert (loaded.model.shared.weight[~masks["model.shared.weight"]] == 0).all()
    assert not (tmp_path / "pruned" / "README.md").exists()


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_push_student_calls_create_repo_and_upload_folder(tiny_marian, tokenizer, tmp_path, online):
    from huggingface_hub import HfApi

    out = save_student(tiny_marian, tokenizer, tmp_path / "student", "---\nlicense: mit\n---\n# s\n")
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", return_value="commit-info") as upload_folder:
        result = push_student(out, "me/tiny-student", private=True, token="hf_dummy", commit_message="first")
    assert result == "commit-info"
    create_repo.assert_called_once()
    kwargs = create_repo.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny-student" and kwargs["private"] is True and kwargs["exist_ok"] is True
    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny-student"
    assert kwargs["folder_path"] == str(out)
    assert kwargs["commit_message"] == "first"
    with pytest.raises(FileNotFoundError):
        push_student(tmp_path / "empty", "me/x")


def test_push_student_offline_fails_fast_and_clearly(tiny_marian, tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = save_student(tiny_marian, tokenizer, tmp_path / "student")
    start = time.perf_counter()
    with mock.patch.object(HfApi, "create_repo") as create_repo:
        with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
            push_student(out, "me/tiny-student", token="hf_dummy")
    create_repo.assert_not_called()  # nothing was attempted
    # and huggingface_hub itself refuses at once too, no hanging network call
    with pytest.raises(OfflineModeIsEnabled):
        HfApi(token="hf_dummy").create_repo(repo_id="me/tiny-student", exist_ok=True)
    assert time.perf_counter() - start < 10
