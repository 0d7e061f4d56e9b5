"""Prompt sets and their loader (issue 5, "Prompt sets"): counts, metadata, subsets, user files, errors."""

import json
import re
from importlib import resources

import pytest

from realign_pipeline.evaluation import PromptRecord, available_prompt_sets, load_prompts
from realign_pipeline.evaluation.prompts import DRAWBENCH_ENV

T2I_VAL = ["color", "shape", "texture", "spatial", "non-spatial", "complex", "3d-spatial", "numeracy"]

EXPECTED = {
    "coco5k": 5000,
    "abc6k": 6434,
    "cc500": 446,
    "geneval": 553,
    "partiprompts": 1632,
    **{f"t2icompbench-{c}": 300 for c in T2I_VAL},
}


def _nonempty_lines(relative: str) -> int:
    text = (
        resources.files("realign_pipeline").joinpath("assets/prompts", relative).read_text(encoding="utf-8")
    )
    return sum(1 for line in text.splitlines() if line.strip())


@pytest.mark.parametrize("name,count", sorted(EXPECTED.items()))
def test_counts_and_ids(name, count):
    records = load_prompts(name)
    assert len(records) == count
    assert all(isinstance(r, PromptRecord) and r.text and r.set == name for r in records)
    assert len({r.id for r in records}) == count  # ids are unique within a set


def test_counts_match_the_shipped_files():
    # Independent of the loader: non-empty lines of the files (many have no final newline).
    assert _nonempty_lines("ABC-6K.txt") == 6434
    assert _nonempty_lines("CC-500.txt") == 602  # only the first 446 are CC-500 proper
    assert _nonempty_lines("coco/mlperf_coco2014_val_5k_captions_source.tsv") == 5001  # + header
    assert _nonempty_lines("PartiPrompts.tsv") == 1633  # + header
    assert _nonempty_lines("geneval/evaluation_metadata.jsonl") == 553
    for c in T2I_VAL:
        assert _nonempty_lines(f"t2icompbench/{c.replace('-', '_')}_val.txt") == 300


def test_available_prompt_sets():
    names = available_prompt_sets()
    for name in [*EXPECTED, "drawbench"]:
        assert name in names
    assert "t2icompbench-color-seen" in names and "t2icompbench-complex-action" in names
    assert names == sorted(names)


def test_coco5k_image_ids():
    records = load_prompts("coco5k")
    ids = [r.metadata["image_id"] for r in records]
    assert len(set(ids)) == 5000
    first = records[0]
    assert first.text == "A city at night with people walking around."
    assert first.metadata["image_id"] == 227049
    assert first.metadata["file_name"] == "COCO_val2014_000000227049.jpg"
    for r in records:
        assert r.metadata["file_name"] == f"COCO_val2014_{r.metadata['image_id']:012d}.jpg"


def test_cc500_is_the_first_446_lines():
    records = load_prompts("cc500")
    assert records[0].text == "a green bench and a red car"
    # "a <colour> <object> and a <colour> <object>" (one pair of lines has "and red bananas").
    pattern = re.compile(r"^an? \w+ [\w ]+ and (an? )?\w+ [\w ]+$", re.IGNORECASE)
    assert all(pattern.match(r.text) for r in records)
    raw = (
        resources.files("realign_pipeline").joinpath("assets/prompts/CC-500.txt").read_text(encoding="utf-8")
    )
    assert raw.splitlines()[446].startswith("a stack of three red cubes")  # line 447: no longer CC-500
    assert records[-1].metadata["line"] == 446


# X11/CSS colour names that occur in ABC-6K (a vocabulary written out here, not taken from the loader).
COLOR_WORDS = frozenset(
    re.findall(
        r"\w+",
        "white black red blue green brown yellow orange snow gray grey pink silver purple tan beige gold "
        "linen khaki maroon teal wheat navy turquoise aqua violet azure orchid indigo",
    )
)


def _words(s):
    # The swapped lines are tokenised ("wo n't", "sink ,"): compare lowercased words only.
    return re.findall(r"[a-z0-9]+", s.lower().replace(" n't", "n't").replace(" 's", "'s"))


def test_abc6k_pairs_are_colour_swaps():
    records = load_prompts("abc6k")
    assert [r.metadata["member"] for r in records[:4]] == ["original", "swapped", "original", "swapped"]
    assert records[5].metadata["pair"] == 2
    raw = (
        resources.files("realign_pipeline").joinpath("assets/prompts/ABC-6K.txt").read_text(encoding="utf-8")
    )
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    assert [r.text for r in records] == lines
    swaps = identical = 0
    for k in range(0, len(lines), 2):
        a, b = _words(lines[k]), _words(lines[k + 1])
        assert len(a) == len(b), (lines[k], lines[k + 1])
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if not diff:  # both colours the same word ("white ... white"): the swap changes nothing
            identical += 1
            continue
        assert len(diff) == 2, (lines[k], lines[k + 1])
        i, j = diff
        assert a[i] == b[j] and a[j] == b[i], (lines[k], lines[k + 1])
        assert a[i] in COLOR_WORDS and a[j] in COLOR_WORDS, (lines[k], lines[k + 1])
        swaps += 1
    assert swaps + identical == 3217
    assert swaps == 3117 and identical == 100
    # A hand-checked pair.
    assert records[0].text == "A room with blue walls and a white sink and door."
    assert _words(records[1].text) == _words("A room with white walls and a blue sink and door.")


def test_geneval_metadata():
    records = load_prompts("geneval")
    assert records[0].text == "a photo of a bench"
    assert records[0].metadata["tag"] == "single_object"
    assert records[0].metadata["include"] == [{"class": "bench", "count": 1}]
    assert {r.metadata["tag"] for r in records} >= {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
    }
    gen = resources.files("realign_pipeline").joinpath("assets/prompts/geneval/generation_prompts.txt")
    assert [r.text for r in records] == [
        x.strip() for x in gen.read_text(encoding="utf-8").splitlines() if x.strip()
    ]


def test_t2icompbench_and_parti_categories():
    r = load_prompts("t2icompbench-non_spatial")  # underscores are accepted too
    assert r[0].set == "t2icompbench-non-spatial" and r[0].metadata["category"] == "non-spatial"
    parti = load_prompts("partiprompts")
    assert len({p.metadata["category"] for p in parti}) == 12
    # TSV without quoting: a prompt that starts with a quote keeps it.
    assert any(p.text.startswith('"G I G G L E"') for p in parti)


def test_subsets():
    assert [r.id for r in load_prompts("cc500", limit=5)] == ["000", "001", "002", "003", "004"]
    a = load_prompts("coco5k", limit=20, seed=42)
    b = load_prompts("coco5k", limit=20, seed=42)
    c = load_prompts("coco5k", limit=20, seed=43)
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.id for r in a] != [r.id for r in c]
    assert len(a) == 20 and len({r.id for r in a}) == 20
    assert [r.id for r in a] != [r.id for r in load_prompts("coco5k", limit=20)]
    assert len(load_prompts("cc500", limit=10_000, seed=1)) == 446
    assert load_prompts("cc500", limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_prompts("cc500", limit=-1)


def test_user_txt(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("a red cube\n\n  a blue ball  \na green cone", encoding="utf-8")  # no final newline
    records = load_prompts(str(p))
    assert [r.text for r in records] == ["a red cube", "a blue ball", "a green cone"]
    assert records[0].set == str(p)
    assert [r.text for r in load_prompts(p, limit=2, seed=0)] == [
        r.text for r in load_prompts(p, limit=2, seed=0)
    ]


def test_user_csv_tsv(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text('Caption,score\n"a cat, sleeping",1\na dog,2\n', encoding="utf-8")
    records = load_prompts(p)
    assert [r.text for r in records] == ["a cat, sleeping", "a dog"]
    assert records[1].metadata == {"score": "2"}
    t = tmp_path / "mine.tsv"
    t.write_text('id\tprompt\n1\t"quoted" thing\n', encoding="utf-8")
    assert load_prompts(t)[0].text == '"quoted" thing'


def test_user_jsonl(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(
        json.dumps({"text": "a horse", "k": 1}) + "\n" + json.dumps({"text": "a cow"}), encoding="utf-8"
    )
    records = load_prompts(p)
    assert [r.text for r in records] == ["a horse", "a cow"]
    assert records[0].metadata == {"k": 1}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*coco5k"):
        load_prompts("nope")
    with pytest.raises(ValueError, match="does not exist.*abc6k"):
        load_prompts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no prompt column.*\['a', 'b'\].*prompt"):
        load_prompts(bad)
    badj = tmp_path / "bad.jsonl"
    badj.write_text('{"foo": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 has no prompt column"):
        load_prompts(badj)
    other = tmp_path / "x.parquet"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompts(other)
    with pytest.raises(ValueError, match="path= is only used with 'drawbench'"):
        load_prompts("cc500", path=bad)


def test_drawbench_needs_a_user_file(tmp_path, monkeypatch):
    monkeypatch.delenv(DRAWBENCH_ENV, raising=False)
    with pytest.raises(ValueError, match="DrawBench is not bundled"):
        load_prompts("drawbench")
    p = tmp_path / "DrawBench.csv"
    p.write_text("Prompts,Category\nA red colored car.,Colors\nA black colored car.,Colors", encoding="utf-8")
    records = load_prompts("drawbench", path=p)
    assert [r.text for r in records] == ["A red colored car.", "A black colored car."]
    assert records[0].set == "drawbench" and records[0].metadata == {"category": "Colors"}
    monkeypatch.setenv(DRAWBENCH_ENV, str(p))
    assert len(load_prompts("drawbench")) == 2


def test_shapes_heldout_is_generated_from_the_world():
    from realign_pipeline.shapes.world import CAPTION_FORMS, HELD_OUT_PAIRINGS, held_out_prompts

    records = load_prompts("shapes-heldout")
    source = held_out_prompts()
    assert "shapes-heldout" in available_prompt_sets()
    # every held-out pairing, every caption form, both orders of mention
    assert len(records) == len(HELD_OUT_PAIRINGS) * len(CAPTION_FORMS) * 2 == len(source)
    assert len({r.id for r in records}) == len(records) and len({r.text for r in records}) == len(records)
    for r, s in zip(records, source):
        assert r.set == "shapes-heldout" and r.text == s["prompt"]
        assert r.metadata == {"form": s["form"], "objects": s["objects"]}
    positional = [r for r in records if r.metadata["form"] in ("left", "right")]
    assert positional and all({o["side"] for o in r.metadata["objects"]} == {"left", "right"} for r in positional)
    # limit / seed as for the other sets; '_' spelling accepted
    assert load_prompts("shapes-heldout", limit=5) == records[:5]
    subset = load_prompts("shapes_heldout", limit=7, seed=3)
    assert subset == load_prompts("shapes-heldout", limit=7, seed=3) != records[:7]
    assert [r.id for r in subset] == sorted(r.id for r in subset) and len(subset) == 7
