"""Converters: tiny fixtures in each real schema -> shards -> read back with our reader; skips counted by reason and logged by id."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visprior.data.convert import (
    CONVERT_COMMANDS,
    convert_img2dataset,
    convert_llava_json,
    convert_mmc4,
    convert_obelics,
    convert_text,
)
from visprior.data.convert.common import KeyMaker
from visprior.data.shards import SkipCounter, iter_samples, read_manifest, resolve_shards


def _image(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    """A flat image with one odd pixel, so a flipped or swapped image is caught."""
    im = Image.new("RGB", size, color)
    im.putpixel((1, 2), (255 - color[0], 255 - color[1], 255 - color[2]))
    return im


def _save(im: Image.Image, path: Path, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and list(a.convert("RGB").getdata()) == list(b.convert("RGB").getdata())


def _read(out: Path, kind: str) -> tuple[list, SkipCounter]:
    counter = SkipCounter()
    return list(iter_samples(resolve_shards(out), kind, counter)), counter


def _skip_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _turns(first: str) -> list[dict]:
    return [{"from": "human", "value": first}, {"from": "gpt", "value": "A red square."}]


# --------------------------------------------------------------------------------------------------------------- llava


def test_llava_json_converts_images_text_only_and_logs_missing(tmp_path: Path) -> None:
    red = _image((200, 10, 10))
    jpg = _save(red, tmp_path / "img" / "coco/train2017/000000033471.jpg", "JPEG")
    records = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": _turns("<image>\nWhat is it?"),
        },
        {"id": "text_only_1", "conversations": _turns("Say something.")},
        {"id": "gone", "image": "coco/train2017/missing.jpg", "conversations": _turns("<image>\nAnd this?")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    manifest = convert_llava_json(
        str(tmp_path / "llava.json"), out=str(out), images=str(tmp_path / "img"), image_format="png"
    )

    assert manifest["converted"] == 2 and manifest["num_samples"] == 2
    assert manifest["skipped"] == {"missing_image": 1}
    assert manifest["skipped_examples"] == {"missing_image": ["gone"]}
    assert read_manifest(out)["converter"] == "llava-json"
    samples, counter = _read(out, "conversation")
    assert counter.skipped == 0
    assert [s.key for s in samples] == ["000000033471", "text_only_1"]
    assert samples[0].conversations == records[0]["conversations"]
    assert _same(samples[0].images[0], Image.open(jpg))  # png storage: exactly the decoded source pixels
    assert samples[1].images == [] and samples[1].meta["id"] == "text_only_1"
    assert [(r["record"], r["reason"]) for r in _skip_log(out)] == [("gone", "missing_image")]


def test_llava_json_multi_image_refusals_and_unique_keys(tmp_path: Path) -> None:
    img = tmp_path / "img"
    _save(_image((0, 90, 0)), img / "a.png")
    _save(_image((0, 0, 90)), img / "b.png")
    (img / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    _save(_image((9, 9, 9)), tmp_path / "secret.png")
    records = [
        {"id": "m.1/x", "image": ["a.png", "b.png"], "conversations": _turns("<image> and <image>: same?")},
        {"id": "m_1_x", "image": "a.png", "conversations": _turns("<image>\nColour?")},
        {"id": "escape", "image": "../secret.png", "conversations": _turns("<image>\nHi")},
        {"id": "absolute", "image": str(tmp_path / "secret.png"), "conversations": _turns("<image>\nHi")},
        {"id": "marks", "image": "a.png", "conversations": _turns("No mark here.")},
        {"id": "broken", "image": "broken.jpg", "conversations": _turns("<image>\nHi")},
        {"id": "badturn", "conversations": [{"from": "robot", "value": "x"}]},
    ]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    manifest = convert_llava_json(str(tmp_path / "mix.json"), out=str(out), images=str(img), image_format="png")

    assert manifest["skipped"] == {"unsafe_path": 2, "image_count_mismatch": 1, "bad_image": 1, "schema": 1}
    samples, _ = _read(out, "conversation")
    assert [s.key for s in samples] == ["m_1_x", "m_1_x-1"]  # dots and slashes sanitised, collision made unique
    assert _same(samples[0].images[0], Image.open(img / "a.png"))
    assert _same(samples[0].images[1], Image.open(img / "b.png"))
    assert samples[0].meta["id"] == "m.1/x"  # the original id is kept for tracing
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mix-000000.tar", "skipped.jsonl"]


# ------------------------------------------------------------------------------------------------------------- obelics


def test_obelics_parquet_with_image_bytes_keeps_order_and_drops_urls(tmp_path: Path) -> None:
    blue = _image((10, 10, 220))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "images": pa.array(
                [
                    [None, {"bytes": _png_bytes(blue), "path": "blue.png"}, None, None],
                    [None, {"bytes": None, "path": "https://example.com/x.jpg"}, None],
                    [{"bytes": None, "path": "https://example.com/y.jpg"}],
                ],
                type=pa.list_(struct),
            ),
            "texts": [["Title", None, "After the image.", "Second paragraph."], ["Before", None, "after"], [None]],
            "metadata": [json.dumps([None, {"src": "blue.png"}, None, None]), "[]", "[]"],
            "general_metadata": [json.dumps({"url": f"https://site/{i}"}) for i in range(3)],
        }
    )
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    manifest = convert_obelics(str(tmp_path / "*.parquet"), out=str(out), image_format="png")

    assert manifest["converted"] == 2 and manifest["skipped"] == {"empty_text": 1}
    assert manifest["dropped_images"] == {"url_not_local": 2}
    (doc0, doc1), counter = _read(out, "interleaved")
    assert counter.skipped == 0
    assert doc0.segments[0] == "Title" and _same(doc0.segments[1], blue)
    assert doc0.segments[2] == "After the image.\n\nSecond paragraph."
    assert doc0.meta["general_metadata"] == {"url": "https://site/0"}
    assert doc0.meta["image_metadata"] == [{"src": "blue.png"}]
    assert doc1.segments == ["Before\n\nafter"]


def test_obelics_jsonl_paths_relative_absolute_and_escaping(tmp_path: Path) -> None:
    img = tmp_path / "img"
    green, grey = _image((0, 160, 0)), _image((120, 120, 120), (5, 5))
    _save(green, img / "pages/green.png")
    absolute = _save(grey, tmp_path / "elsewhere/grey.png")
    _save(_image((1, 2, 3)), tmp_path / "secret.png")
    doc = {
        "images": ["pages/green.png", None, str(absolute), "../secret.png", None],
        "texts": [None, "between", None, None, "end"],
        "metadata": "[]",
        "general_metadata": "{}",
    }
    src = tmp_path / "obelics.jsonl"
    src.write_text(json.dumps(doc) + "\nnot json\n" + json.dumps({"images": [None], "texts": [None]}) + "\n")
    out = tmp_path / "out"
    manifest = convert_obelics(str(src), out=str(out), images=str(img), image_format="png")

    assert manifest["skipped"] == {"bad_json": 1, "schema": 1}
    assert manifest["dropped_images"] == {"unsafe_path": 1}
    ((sample,), _) = _read(out, "interleaved")
    assert [type(s).__name__ for s in sample.segments] == ["Image", "str", "Image", "str"]
    assert _same(sample.segments[0], green) and _same(sample.segments[2], grey) and sample.segments[3] == "end"

    strict = convert_obelics(str(src), out=str(tmp_path / "strict"), images=str(img), allow_absolute_paths=False)
    assert strict["dropped_images"] == {"unsafe_path": 2}


# ---------------------------------------------------------------------------------------------------------------- mmc4


def test_mmc4_places_each_image_before_its_matched_sentence(tmp_path: Path) -> None:
    img = tmp_path / "images"
    a, b = _image((250, 200, 0)), _image((0, 200, 250))
    _save(a, img / "aaa111.png")
    _save(b, img / "bbb222.png")

    def info(name: str, index: int) -> dict:
        return {"image_name": name, "raw_url": f"http://x/{name}", "matched_text_index": index, "matched_sim": 0.3}

    docs = [
        {
            "url": "http://page/1",
            "text_list": ["S0.", "S1.", "S2."],
            "image_info": [info("aaa111.png", 2), info("bbb222.png", 0), info("gone.png", 1), info("aaa111.png", 7)],
            "similarity_matrix": [[0.1, 0.2, 0.3]] * 4,
        },
        {"url": "http://page/2", "text_list": ["Only text."], "image_info": [info("../aaa111.png", 0)]},
        {"url": "http://page/3", "text_list": "not a list", "image_info": []},
    ]
    src = tmp_path / "docs_shard_0_v2.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    manifest = convert_mmc4(str(src), out=str(out), images=str(img), image_format="png")

    assert manifest["converted"] == 2 and manifest["skipped"] == {"schema": 1}
    assert manifest["dropped_images"] == {"missing_image": 1, "bad_index": 1, "unsafe_path": 1}
    (doc, text_only), _ = _read(out, "interleaved")
    assert _same(doc.segments[0], b) and doc.segments[1] == "S0. S1." and _same(doc.segments[2], a)
    assert doc.segments[3] == "S2." and len(doc.segments) == 4
    assert [i["image_name"] for i in doc.meta["image_info"]] == ["bbb222.png", "aaa111.png"]
    assert "similarity_matrix" not in doc.meta and text_only.segments == ["Only text."]
    assert {r["record"] for r in _skip_log(out)} >= {"docs_shard_0_v2.jsonl:1/image_info[2]", "docs_shard_0_v2.jsonl:3"}


# --------------------------------------------------------------------------------------------------------- img2dataset


def _img2dataset_tar(path: Path, pixels: Image.Image) -> None:
    buf = io.BytesIO()
    pixels.save(buf, format="JPEG", quality=95)
    members = [
        ("000000000.jpg", buf.getvalue()),
        ("000000000.txt", b"a yellow square"),
        ("000000000.json", json.dumps({"key": "000000000", "url": "http://x", "status": "success"}).encode()),
        ("000000001.jpg", buf.getvalue()),
        ("000000001.txt", b"again"),
        ("000000002.txt", b"caption without image"),
        ("000000003.jpg", b"\xff\xd8 truncated"),
        ("000000003.txt", b"broken image"),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def test_img2dataset_index_points_at_originals_and_rewrite_copies(tmp_path: Path) -> None:
    yellow = _image((230, 230, 0))
    _img2dataset_tar(tmp_path / "dl/00000.tar", yellow)

    index = convert_img2dataset(str(tmp_path / "dl/*.tar"), out=str(tmp_path / "idx"))
    assert index["mode"] == "index" and index["num_samples"] == 3 and index["skipped"] == {"missing_member": 1}
    assert not list((tmp_path / "idx").glob("*.tar"))
    samples, counter = _read(tmp_path / "idx", "pair")
    assert [s.text for s in samples] == ["a yellow square", "again"]
    assert counter.by_reason == {"bad_image": 1, "missing_member": 1}  # left in place, skipped by the reader
    assert samples[0].meta["status"] == "success"

    validated = convert_img2dataset(str(tmp_path / "dl/00000.tar"), out=str(tmp_path / "dl"), validate=True)
    assert validated["num_samples"] == 2 and validated["shards"][0]["path"] == "00000.tar"  # relative: beside the tars
    assert validated["skipped"] == {"bad_image": 1, "missing_member": 1}

    rewrite = convert_img2dataset(
        str(tmp_path / "dl/00000.tar"), out=str(tmp_path / "rw"), mode="rewrite", image_format="png"
    )
    assert rewrite["num_samples"] == 2
    rewritten, counter = _read(tmp_path / "rw", "pair")
    assert counter.skipped == 0 and _same(rewritten[0].image, samples[0].image)


# ---------------------------------------------------------------------------------------------------------------- text


def test_text_jsonl_and_parquet_with_categories(tmp_path: Path) -> None:
    rows = [
        {"id": "doc.1", "text": "First document."},
        {"id": "doc/1", "text": "Second document.", "category": "code"},
        {"id": "empty", "text": "   "},
        {"id": "none"},
    ]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = convert_text(str(tmp_path / "corpus.jsonl"), out=str(tmp_path / "t1"))
    assert out["skipped"] == {"empty_text": 1, "schema": 1}
    samples, _ = _read(tmp_path / "t1", "text")
    assert [(s.key, s.text, s.meta["category"]) for s in samples] == [
        ("doc_1", "First document.", "uncategorized"),
        ("doc_1-1", "Second document.", "code"),
    ]
    assert samples[0].meta["source"] == "corpus"

    pq.write_table(pa.table({"text": ["alpha", "beta", ""]}), tmp_path / "wiki.parquet")
    manifest = convert_text(
        str(tmp_path / "wiki.parquet"), out=str(tmp_path / "t2"), category="encyclopedia", maxcount=1
    )
    assert len(manifest["shards"]) == 2 and manifest["skipped"] == {"empty_text": 1}
    nothing = convert_text(str(tmp_path / "corpus.jsonl"), out=str(tmp_path / "t3"), text_field="missing")
    assert nothing["num_samples"] == 0 and nothing["skipped"] == {"schema": 4}
    assert sorted(p.name for p in (tmp_path / "t3").iterdir()) == [
        "manifest.json",
        "skipped.jsonl",
    ]  # no empty tar left
    samples, _ = _read(tmp_path / "t2", "text")
    assert [(s.text, s.meta) for s in samples] == [
        ("alpha", {"category": "encyclopedia", "source": "wiki"}),
        ("beta", {"category": "encyclopedia", "source": "wiki"}),
    ]


# -------------------------------------------------------------------------------------------------------------- safety


def test_unsafe_names_and_clobbering_outputs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="dataset name"):
        convert_text(str(tmp_path / "c.jsonl"), out=str(tmp_path / "out"), name="../../escape")
    assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("escape*"))
    _img2dataset_tar(tmp_path / "dl/pairs-000000.tar", _image((1, 1, 1)))
    with pytest.raises(ValueError, match="overwrite the source"):
        convert_img2dataset(str(tmp_path / "dl/pairs-000000.tar"), out=str(tmp_path / "dl"), mode="rewrite")
    assert (tmp_path / "dl/pairs-000000.tar").stat().st_size > 0


def test_keys_are_safe_and_unique() -> None:
    make = KeyMaker()
    keys = [make(k) for k in ["a.b", "a/b", "a_b", "a_b-1", "", "../x", "é"]]
    assert keys == ["a_b", "a_b-1", "a_b-2", "a_b-1-1", "sample", "___x", "_"]
    assert len(set(keys)) == len(keys)


def test_every_converter_is_registered_with_typed_documented_arguments() -> None:
    import inspect

    assert set(CONVERT_COMMANDS) == {"llava-json", "obelics", "mmc4", "img2dataset", "text"}
    for fn in CONVERT_COMMANDS.values():
        params = inspect.signature(fn).parameters
        assert {"src", "out", "maxcount"} <= set(params) and "Args:" in (fn.__doc__ or "")
        assert all(p.annotation is not inspect.Parameter.empty for p in params.values())


def test_design_command_lines_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`visprior data convert <name> SRC --images DIR --out DIR`, as DESIGN.md writes it (jsonargparse, as_positional)."""
    from jsonargparse import CLI

    monkeypatch.chdir(tmp_path)
    Path("c.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    Path("docs.jsonl").write_text(json.dumps({"text_list": ["Hi."], "image_info": []}) + "\n")
    Path("images").mkdir()
    text = CLI({"convert": CONVERT_COMMANDS}, args=["convert", "text", "c.jsonl", "--category", "web", "--out", "t"])
    assert text["num_samples"] == 1 and read_manifest("t")["converter"] == "text"
    mmc4 = CLI(
        {"convert": CONVERT_COMMANDS}, args=["convert", "mmc4", "docs.jsonl", "--images", "images", "--out", "m"]
    )
    assert mmc4["num_samples"] == 1
    with pytest.raises(SystemExit):
        CLI({"convert": CONVERT_COMMANDS}, args=["convert", "mmc4", "docs.jsonl", "--out", "m"])  # --images is required


def test_dataset_manifests_name_a_real_converter_command() -> None:
    """Each data/manifests/*.yaml opens with the command that converts it, and names the fields recipes rely on."""
    import yaml

    files = sorted((Path(__file__).parents[1] / "data" / "manifests").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        first = f.read_text().splitlines()[0].split()
        meta = yaml.safe_load(f.read_text())
        assert {"name", "source", "license", "format", "kind", "converter", "expected", "notes"} <= set(meta), f.name
        assert first[:4] == ["#", "visprior", "data", "convert"] and first[4] == meta["converter"], f.name
        assert meta["converter"] in CONVERT_COMMANDS and "--out" in first, f.name
