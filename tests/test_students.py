"""make_student copies exactly the stated teacher layers; from-config students; the tokenizer layout."""

import pytest
import torch

from hf_seqkd import (
    count_parameters,
    layers_to_copy,
    make_student,
    make_student_from_config,
    tiny_seq2seq_model,
    train_tokenizer,
)


def test_layer_maps_follow_shleifer_and_rush():
    assert layers_to_copy(12, 6) == [0, 2, 4, 7, 9, 11]
    assert layers_to_copy(12, 3) == [0, 6, 11]
    assert layers_to_copy(6, 3) == [0, 2, 5]
    assert layers_to_copy(6, 6) == list(range(6))
    assert layers_to_copy(8, 3) == [0, 4, 7]  # the even-spread rule, first and last kept
    with pytest.raises(ValueError):
        layers_to_copy(6, 7)


def _stack(model, side):
    if hasattr(model, "model"):
        return getattr(model.model, side).layers
    return getattr(model, side).block


@pytest.mark.parametrize("family", ["marian", "bart", "t5"])
def test_make_student_copies_exactly_the_stated_layers(tokenizer, family):
    teacher = tiny_seq2seq_model(tokenizer, family, d_model=32, encoder_layers=6, decoder_layers=6, seed=3)
    student = make_student(teacher, encoder_layers=3, decoder_layers=[1, 4])
    assert student.config.student_layer_map == {"encoder": [0, 2, 5], "decoder": [1, 4]}
    for side, ids in (("encoder", [0, 2, 5]), ("decoder", [1, 4])):
        s_layers, t_layers = _stack(student, side), _stack(teacher, side)
        assert len(s_layers) == len(ids)
        for s_index, t_index in enumerate(ids):
            s_state, t_state = s_layers[s_index].state_dict(), t_layers[t_index].state_dict()
            for name, value in s_state.items():
                if name not in t_state:  # T5's relative bias lives in block 0 only
                    assert "relative_attention_bias" in name
                    value_t = t_layers[0].state_dict()[name]
                else:
                    value_t = t_state[name]
                assert torch.equal(value, value_t), (side, s_index, name)
            # and differs from a neighbouring teacher layer (the test can tell layers apart)
            other = t_layers[(t_index + 1) % len(t_layers)].state_dict()
            assert any(not torch.equal(v, other[k]) for k, v in s_state.items() if k in other)
    emb = student.get_input_embeddings().weight
    assert torch.equal(emb, teacher.get_input_embeddings().weight)
    assert count_parameters(student) < count_parameters(teacher)
    # the student runs
    enc = tokenizer(["ka lo mi"], return_tensors="pt")
    out = student.generate(**enc, max_new_tokens=3)
    assert out.shape[0] == 1


def test_make_student_bad_layer_ids(tokenizer):
    teacher = tiny_seq2seq_model(tokenizer, "marian", encoder_layers=4, decoder_layers=4)
    with pytest.raises(ValueError, match=r"encoder layer ids \[7\] are outside the teacher's 0..3"):
        make_student(teacher, encoder_layers=[0, 7])


def test_student_from_config_shares_vocabulary_and_scales_embeddings(tokenizer):
    teacher = tiny_seq2seq_model(tokenizer, "marian", d_model=64, encoder_layers=3, decoder_layers=3)
    student = make_student_from_config(teacher, d_model=32, encoder_layers=1, decoder_layers=2, ffn_dim=64,
                                       attention_heads=2)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert (student.config.d_model, student.config.encoder_layers, student.config.decoder_layers) == (32, 1, 2)
    assert student.config.scale_embedding is True
    assert student.config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_layout(tokenizer):
    assert tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.eos_token_id == 0
    ids = tokenizer("ka lo")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ka lo"


PUNCTUATED = ["A man in an orange hat, staring at something.", "Ein Boston Terrier läuft über saftig-grünes Gras.",
              "The dog's ball - a red one - is (still) there!", '"Hello," she says.', "Zwei Männer: einer lacht..."]


@pytest.mark.parametrize("split", [True, False])
def test_tokenizer_punctuation_split_and_exact_decoding(split):
    texts = PUNCTUATED * 40 + ["the fence. the fence, a fence"] * 40
    tokenizer = train_tokenizer(texts, vocab_size=300, split_punctuation=split)
    merged = [t for t in tokenizer.get_vocab() if any(c in ".,!?:;()\"'-" for c in t) and any(c.isalpha() for c in t)]
    assert (merged == []) == split, merged  # no subword joins letters and punctuation when split
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("the fence.")["input_ids"])
    assert (pieces[-3:] == ["▁fence", ".", "</s>"]) == split, pieces
    for text in PUNCTUATED:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.pad_token_id == len(tokenizer) - 1 and tokenizer.eos_token_id == 0
