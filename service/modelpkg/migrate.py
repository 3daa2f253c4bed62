"""Move a model of the flat layout into a model folder (docs/model-package.md).

    csist migrate-model models/derefnet.onnx                      # writes models/derefnet/
    csist migrate-model models/derefnet-int8.onnx --move          # and removes the flat files

The flat layout kept a model as ``<stem>.onnx`` with its card ``<stem>.json`` beside it and
every other file named after the stem. This command reads the card, checks every file it lists
against the card's SHA-256 (a model whose files do not match is not migrated), copies them into
the folder under the package's names (``model.onnx``, ``encoder.onnx``, ``head.seg0.onnx``,
``amx/encoder.seg0.onnx``, ...), and writes ``manifest.json`` (identity, interface, files,
plans) and ``provenance.json`` (everything else the card recorded, and this migration). An
int8 card's float32 source becomes ``quantized_from``: the folder that migrating that source
with the default ``--out`` gives. ``--move`` then removes the flat files named after the model's
stem (a file another model's card shares, such as a float32 head, stays).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
from pathlib import Path

from pydantic import ValidationError

from service.modelpkg.manifest import (
    AMX_SPLIT,
    HEAD_SPLIT,
    MODEL_FILE,
    SCHEMA_VERSION,
    FileSpec,
    Interface,
    Manifest,
    ModelPackage,
    PackageError,
    PartSpec,
    Plans,
    Provenance,
    SourceSpec,
    SplitSpec,
    file_sha256,
    load_package,
    part_file,
    read_json,
    split_file_names,
    validation_problems,
    write_package,
)

# Keys of a flat card that the manifest holds; the others go to the provenance.
INTERFACE_KEYS = ("opset", "inputs", "outputs", "physics", "postprocess", "config", "parameters")
MANIFEST_KEYS = ("name", "version", "file", "sha256", "bytes", "parts", HEAD_SPLIT, AMX_SPLIT, *INTERFACE_KEYS)
SPLIT_KEYS = tuple(SplitSpec.model_fields)
AMX_PARTS = ("encoder", "head", "align", "fuse")


def _current_split_format(entry: dict) -> dict:
    """A split entry of the older deform-only format (head / head_sha256 / deform) in the
    current one (part / part_sha256 / steps)."""
    if "deform" not in entry or "steps" in entry:
        return entry
    entry = dict(entry)
    entry.setdefault("part", entry.pop("head", None))
    entry.setdefault("part_sha256", entry.pop("head_sha256", None))
    entry["steps"] = [
        {
            "op": "DeformConv",
            "inputs": [d.get("input"), d.get("offset")],
            **{k: d.get(k) for k in ("output", "weight", "bias")},
        }
        for d in entry.pop("deform")
    ]
    return entry


class _Files:
    """The flat files of the card and their names in the folder, with the card's hashes."""

    def __init__(self):
        self.names: dict[str, str] = {}  # flat file -> file in the folder
        self.hashes: dict[str, str] = {}

    def add(self, flat: str, name: str, sha256: str) -> str:
        taken = {v: k for k, v in self.names.items()}
        if self.names.get(flat, name) != name or taken.get(name, flat) != flat:
            raise PackageError(f"the card lists {flat} in two roles; migrate it by hand")
        self.names[flat], self.hashes[flat] = name, sha256.lower()
        return name


def _split(files: _Files, parts: dict[str, str], entry: dict, plan: str, part: str) -> tuple[dict, dict]:
    """(the split entry with the folder's file names, what else the card recorded with it)."""
    entry = _current_split_format(entry)
    segments, weights = split_file_names(plan, part, len(entry.get("segments") or []))
    new = {k: v for k, v in entry.items() if k in SPLIT_KEYS}
    new["part"] = parts.get(entry.get("part"), entry.get("part"))
    new["segments"] = [
        None if s is None else {**s, "file": files.add(s["file"], segments[i], s["sha256"])}
        for i, s in enumerate(entry.get("segments") or [])
    ]
    w = entry["weights"]
    new["weights"] = {**w, "file": files.add(w["file"], weights, w["sha256"])}
    return new, {k: v for k, v in entry.items() if k not in SPLIT_KEYS}


def migrate(flat: str | Path, out: str | Path | None = None, move: bool = False, command: str = "") -> ModelPackage:
    """Migrate the flat model ``flat`` (its ``.onnx``, or its card) into the folder ``out``
    (default: the ``.onnx`` path without its suffix); return the package written."""
    flat = Path(flat)
    card_path = flat if flat.suffix == ".json" else flat.with_suffix(".json")
    card = read_json(card_path, "model card")
    if not isinstance(card, dict) or "schema_version" in card:
        raise PackageError(f"{card_path} is not a card of the flat layout (it has a schema_version, or no fields)")
    source = card_path.parent
    onnx_path = source / str(card.get("file") or card_path.with_suffix(".onnx").name)
    out = Path(out) if out is not None else onnx_path.with_suffix("")
    if (out / "manifest.json").exists():
        raise PackageError(f"{out} already holds a model (manifest.json); choose another --out")
    files = _Files()
    try:
        model = FileSpec(
            file=files.add(onnx_path.name, MODEL_FILE, card["sha256"]), sha256=card["sha256"], bytes=card.get("bytes")
        )
        parts = {}
        names = {}
        for name, spec in (card.get("parts") or {}).items():
            names[spec["file"]] = files.add(spec["file"], part_file(name), spec["sha256"])
            parts[name] = PartSpec.model_validate({**spec, "file": names[spec["file"]]})
        checks, plans = {}, {}
        if card.get(HEAD_SPLIT):
            plans[HEAD_SPLIT], checks[HEAD_SPLIT] = _split(files, names, card[HEAD_SPLIT], HEAD_SPLIT, "head")
        if card.get(AMX_SPLIT):
            amx = {k: v for k, v in card[AMX_SPLIT].items() if k not in AMX_PARTS}
            plans[AMX_SPLIT] = {"precision": amx.pop("precision", None)}
            for name in AMX_PARTS:
                if card[AMX_SPLIT].get(name):
                    plans[AMX_SPLIT][name], extra = _split(files, names, card[AMX_SPLIT][name], AMX_SPLIT, name)
                    amx.update({f"{name}.{k}": v for k, v in extra.items()})
            checks[AMX_SPLIT] = amx
        quantization = card.get("quantization") or {}
        origin = quantization.get("source") or {}
        quantized_from = None
        if origin.get("file") and origin.get("sha256"):
            package = Path(os.path.relpath(source / Path(origin["file"]).with_suffix(""), out)).as_posix()
            quantized_from = SourceSpec(package=package, sha256=origin["sha256"])
        manifest = Manifest(
            name=card["name"],
            version=card["version"],
            interface=Interface.model_validate({k: card[k] for k in INTERFACE_KEYS if k in card}),
            model=model,
            parts=parts,
            plans=Plans.model_validate(plans),
            quantized_from=quantized_from,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise PackageError(f"{card_path} is not a complete card of the flat layout: missing {exc}") from None
    except ValidationError as exc:
        raise PackageError(f"{card_path} cannot become a manifest: {validation_problems(exc)}") from None
    for flat_name, digest in files.hashes.items():
        path = source / flat_name
        if not path.is_file():
            raise PackageError(f"{path} is listed in {card_path} but not there: not migrated")
        if file_sha256(path) != digest:
            raise PackageError(
                f"SHA-256 mismatch: {path} has {file_sha256(path)} but {card_path} says {digest}: not migrated"
            )
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    provenance = Provenance.model_validate(
        {
            **{k: v for k, v in card.items() if k not in MANIFEST_KEYS},
            "plans": checks,
            "migrated": {
                "from": f"{onnx_path.name} + {card_path.name} (flat layout)",
                "schema_version": SCHEMA_VERSION,
                "command": command or f"csist migrate-model {flat} --out {out}",
                "date": date,
            },
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    for flat_name, name in files.names.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / flat_name, out / name)
    write_package(out, manifest, provenance)
    package = load_package(out)
    if move:
        own = f"{onnx_path.stem}."
        for flat_name in [*files.names, card_path.name]:
            if flat_name.startswith(own):
                (source / flat_name).unlink()
    return package


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csist migrate-model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", type=Path, help="the flat model: its .onnx file (with <stem>.json beside it), or that card")
    p.add_argument(
        "--out", type=Path, default=None, help="the model folder to write (default: the .onnx path without .onnx)"
    )
    p.add_argument("--move", action="store_true", help="remove the flat files of the model once the folder is written")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        package = migrate(args.model, args.out, args.move, "csist migrate-model " + " ".join(argv))
    except PackageError as exc:
        raise SystemExit(f"csist migrate-model: error: {exc}") from None
    print(
        f"wrote {package.manifest_path} (schema_version {SCHEMA_VERSION}) and {len(package.manifest.files)} files "
        f"in {package.directory}" + ("; removed the flat files" if args.move else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
