"""Fuzzed safetensors headers: a one-line refusal naming the problem, or a file that really reads.

The header reader (`safetensors_file.read_header`) is fed a few hundred seeded mutations of a valid
header; each must either raise `HeaderError` (nothing else) or return a header whose every tensor
then reads, through our reader and through sd-mecha's, with the declared shape and dtype. A handful
of the same kinds go through the command line, which must print one line naming the file.
"""

from __future__ import annotations

import json
import pathlib
import random
import tracemalloc

import pytest
import torch
from support import quirks

from sd_mecha_rebasin.cli.commands import main
from sd_mecha_rebasin.common.errors import UserError
from sd_mecha_rebasin.files.checkpoint import open_checkpoint
from sd_mecha_rebasin.files.safetensors_file import MAX_HEADER_BYTES, HeaderError, read_header, read_tensors

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.arange(5, dtype=torch.float16),
    "c.ids": torch.arange(7, dtype=torch.int64).reshape(1, 7),
    "d.empty": torch.zeros(0, 3),
}


def _entries() -> dict:
    return json.loads(quirks.header_json(TENSORS, {"format": "pt", "note": "x"}))


def _data() -> bytes:
    return b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in TENSORS.values())


def _file(
    path: pathlib.Path, raw: bytes, data: bytes | None = None, declared: int | None = None
) -> pathlib.Path:
    path.write_bytes(
        (len(raw) if declared is None else declared).to_bytes(8, "little")
        + raw
        + (data if data is not None else _data())
    )
    return path


def _dump(header) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _mutate(rng: random.Random) -> tuple[str, bytes, bytes | None, int | None]:
    """(kind, header bytes, data or None for the valid data, declared length or None)."""
    header = _entries()
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(
        [
            "random-bytes", "flipped-bytes", "truncated-json", "declared-length", "offsets", "shape",
            "dtype", "duplicate", "metadata", "entry-type", "deep-nesting", "constants", "top-level",
            "reordered", "data-size", "odd-name", "huge-ndim",
        ]
    )  # fmt: skip
    raw, data, declared = None, None, None
    if kind == "random-bytes":
        raw = rng.randbytes(rng.randrange(1, 600))
    elif kind == "flipped-bytes":
        raw = bytearray(_dump(header))
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif kind == "truncated-json":
        full = _dump(header)
        raw = full[: rng.randrange(0, len(full))]
    elif kind == "declared-length":
        declared = rng.choice(
            [0, 2**64 - 1, 2**64 - rng.randrange(1, 1000), 2**63, rng.randrange(500, 10**9)]
        )
    elif kind == "offsets":  # of a tensor with data, onto another tensor's
        name, other_name = rng.sample([k for k in names if k != "d.empty"], 2)
        entry = header[name]
        begin, end = entry["data_offsets"]
        other = header[other_name]["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [begin, end + 10**6], [end, begin], [-4, end - begin - 4], [begin + 0.5, end],
                [str(begin), end], [begin], [begin, end, end], None, [2**70, 2**70 + end - begin],
                [other[0], other[0] + end - begin], [begin + 1, end + 1],
            ]
        )  # fmt: skip
    elif kind == "shape":
        entry["shape"] = rng.choice(
            [[-1, 4], [3.0, 4], ["3", 4], [True, 4], [[3], 4], [2**62, 2**62], 5, None, [3, -4], [1e400]]
        )
    elif kind == "dtype":
        entry["dtype"] = rng.choice(["F4", "C64", "U64", "", 7, None, ["F32"], "f32"])
    elif kind == "duplicate":
        text = _dump(header).decode()
        piece = f'"{name}":{json.dumps(entry, separators=(",", ":"))}'
        raw = text.replace(piece, piece + "," + piece).encode()
    elif kind == "metadata":
        header["__metadata__"] = rng.choice(
            [{"n": 1}, {"n": None}, {"n": ["x"]}, {"n": {"x": "y"}}, "text", [1, 2], 3.5, None]
        )
    elif kind == "entry-type":
        header[name] = rng.choice([[1, 2], "tensor", 3, None, True])
    elif kind == "deep-nesting":
        depth = rng.randrange(1000, 200000)
        raw = b"[" * depth + b"]" * depth
    elif kind == "constants":
        raw = _dump(header).replace(
            b'"shape":[3,4]', rng.choice([b'"shape":[NaN,4]', b'"shape":[Infinity,4]'])
        )
    elif kind == "top-level":
        raw = rng.choice([b"[]", b'"text"', b"42", b"null", b"true"])
    elif kind == "reordered":  # valid: JSON order need not follow data order
        raw = _dump({"__metadata__": header.pop("__metadata__"), **dict(reversed(list(header.items())))})
    elif kind == "odd-name":  # a long name with a line break, on a bad entry: the message stays one line
        odd = "x\n" * rng.randrange(1, 5000)
        header[odd] = {**header.pop(name), "dtype": "C64"}
    elif kind == "huge-ndim":  # the element count must not be computed as one huge number
        entry["shape"] = [2**40] * rng.randrange(10000, 60000)
    elif kind == "data-size":
        full = _data()
        data = rng.choice([full[: rng.randrange(len(full))], full + rng.randbytes(rng.randrange(1, 100))])
    return kind, raw if raw is not None else _dump(header), data, declared


def _check_accepted(path: pathlib.Path, header) -> None:
    """An accepted header must describe tensors that both readers return as declared."""
    from sd_mecha.extensions import model_formats

    ours = dict(read_tensors(path, header, list(header.tensors)))
    reader = model_formats.resolve("single_file").get_read_dict(path, 1 << 16)
    try:
        for key, entry in header.tensors.items():
            for value in (ours[key], reader[key]):
                assert value.dtype == entry.dtype and tuple(value.shape) == entry.shape, key
            assert torch.equal(ours[key], reader[key]), key
    finally:
        reader.close()


def test_seeded_fuzz_of_the_header_reader(tmp_path):
    rng = random.Random(1234)
    refused: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for i in range(400):
        kind, raw, data, declared = _mutate(rng)
        path = _file(tmp_path / f"f{i}.safetensors", raw, data, declared)
        try:
            header = read_header(path)
        except HeaderError as e:
            message = str(e)
            assert message and "\n" not in message and len(message) < 300, (kind, message)
            refused[kind] = refused.get(kind, 0) + 1
            with pytest.raises(UserError) as info:  # the same through the checkpoint opener
                open_checkpoint(path)
            assert str(info.value).startswith(str(path)), str(info.value)
        else:
            _check_accepted(path, header)
            accepted[kind] = accepted.get(kind, 0) + 1
        path.unlink()
    # every kind of damage was tried and refused; the valid kinds were accepted
    for kind in ("random-bytes", "declared-length", "offsets", "shape", "dtype", "duplicate", "metadata",
                 "entry-type", "deep-nesting", "constants", "top-level", "odd-name", "huge-ndim"):  # fmt: skip
        assert refused.get(kind, 0) >= 5 and kind not in accepted, (kind, refused, accepted)
    assert accepted.get("reordered", 0) >= 5 and "reordered" not in refused
    assert sum(refused.values()) + sum(accepted.values()) == 400


def test_offsets_out_of_json_order_and_gaps_read_correctly(tmp_path):
    header = _entries()
    # data laid out b, a (a 16-byte gap between them), then c, d; JSON lists them a, b, c, d
    sizes = {k: t.numel() * t.element_size() for k, t in TENSORS.items()}
    layout = [("b.bias", 0), ("a.weight", sizes["b.bias"] + 16)]
    pos = layout[-1][1] + sizes["a.weight"]
    layout += [("c.ids", pos), ("d.empty", pos + sizes["c.ids"])]
    data = bytearray(layout[-1][1])
    for key, begin in layout:
        header[key]["data_offsets"] = [begin, begin + sizes[key]]
        data[begin : begin + sizes[key]] = TENSORS[key].reshape(-1).view(torch.uint8).numpy().tobytes()
    path = _file(tmp_path / "gap.safetensors", _dump(header), bytes(data))
    parsed = read_header(path)
    assert parsed.extra_bytes == 16
    for key, value in read_tensors(path, parsed, list(TENSORS)):
        assert value.dtype == TENSORS[key].dtype and torch.equal(value, TENSORS[key]), key
    _check_accepted(path, parsed)


@pytest.mark.parametrize(
    "declared, file_bytes, needle",
    [
        (2**64 - 1, 1000, "no valid header"),
        (50_000_000, 1000, "truncated safetensors file: its header needs 50000008 bytes"),
        (MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES + 100, "over the format's limit"),
    ],
)
def test_declared_lengths_never_allocate_more_than_the_file_holds(tmp_path, declared, file_bytes, needle):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # sparse: the 100 MB metadata blob costs no disk
        f.write(declared.to_bytes(8, "little") + b'{"__metadata__":{"blob":"')
        f.truncate(file_bytes)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError, match=needle):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing near the declared length was read


@pytest.mark.parametrize(
    "name, raw, needle",
    [
        ("random", b"\x93\x11\xfe\x00garbage" * 30, "not a safetensors file"),
        ("duplicate", b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "the name 'x' appears twice"),
        ("overlap", b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', "overlaps the data of"),
        ("metadata", b'{"__metadata__":{"steps":1000},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "__metadata__ value 'steps' is not a string (int)"),
        ("shape", b'{"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', "not a list of non-negative integers"),
        ("dtype", b'{"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', "'x' has dtype 'C64'"),
        ("past-end", b'{"x":{"dtype":"F32","shape":[20],"data_offsets":[0,80]}}', "truncated safetensors file: 'x' ends at byte 80"),
    ],
)  # fmt: skip
def test_bad_headers_through_the_cli_are_one_line(tmp_path, monkeypatch, capsys, name, raw, needle):
    monkeypatch.chdir(tmp_path)
    good = quirks.save(tmp_path / "good.safetensors", quirks.fragment())
    bad = _file(tmp_path / f"{name}.safetensors", raw, b"\x00" * 8)
    for args in (["merge", good, bad], ["inspect", bad]):
        rc = main([str(a) for a in args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1 and len(lines) == 1, err
        assert lines[0].startswith(f"sd-rebasin: error: {bad}: ") and needle in lines[0], lines[0]
        assert "internal error" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.safetensors", bad.name])
