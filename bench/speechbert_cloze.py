"""Spoken cloze of a pretrained single-stream model on a store's spoken captions: does it use the audio?

For every held-out clip of a ``speech.features`` artifact and every word of its transcript, the word
is masked in the text and the model fills it, reading the clip's audio as it is, zeroed (no audio:
every audio token as masked acoustic modelling masks it) or another clip's
(:func:`fusion.pretrain.speech_recipes.spoken_cloze`). ``audio_gain`` = accuracy with the audio minus
accuracy with zeros, measured in one run on the same queries; a model that ignores the audio gains 0.
Queries are the clips of the model's own held-out split (as ``fusion.retrieval`` picks them).

The artifacts are named by folder, or found in a store by stage name (the newest artifact whose
manifest names that stage), e.g. after ``stele run pipelines/spoken_names.yaml --store S``::

    python bench/speechbert_cloze.py --store S --model speechbert --features emoji_speech
    python bench/speechbert_cloze.py --model-dir S/artifacts/<key> --features-dir S/artifacts/<key>
    python bench/speechbert_cloze.py ... --split all --words 20    # also print 20 asked words
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def artifact_of(store: str, stage: str) -> Path:
    """The folder of the newest complete artifact whose manifest names stage ``stage``."""
    found = []
    for manifest in Path(store).glob("artifacts/*/manifest.json"):
        m = json.loads(manifest.read_text())
        if m.get("stage") == stage:
            found.append((m.get("finished_unix", 0.0), manifest.parent))
    if not found:
        raise SystemExit(f"no artifact of stage {stage!r} in store {store} "
                         f"(looked at artifacts/*/manifest.json)")
    return max(found)[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="artifact store folder (with --model / --features)")
    ap.add_argument("--model", default="speechbert", help="stage name of the fusion.pretrain artifact")
    ap.add_argument("--features", default="emoji_speech",
                    help="stage name of the speech.features artifact")
    ap.add_argument("--model-dir", type=Path, help="the fusion.pretrain artifact's folder")
    ap.add_argument("--features-dir", type=Path, help="the speech.features artifact's folder")
    ap.add_argument("--split", default="test", help="test (the model's held-out clips), train or all")
    ap.add_argument("--limit", type=int, help="only the first N clips of the split")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--words", type=int, default=0, help="print the first N asked words and their hits")
    args = ap.parse_args(argv)
    if args.model_dir is None or args.features_dir is None:
        if not args.store:
            ap.error("give --store (with stage names) or both --model-dir and --features-dir")
    model_dir = args.model_dir or artifact_of(args.store, args.model)
    features_dir = args.features_dir or artifact_of(args.store, args.features)

    from fusion.pretrain.speech_recipes import evaluate_cloze

    from pipeline import StageFailed

    try:
        result = evaluate_cloze(model_dir, features_dir, args.split, args.limit, args.batch_size, args.device)
    except StageFailed as e:
        raise SystemExit(f"speechbert_cloze: {e}") from None
    per_word = result.pop("per_word")
    result |= {"model_dir": str(model_dir), "features_dir": str(features_dir)}
    print(json.dumps(result, indent=1))
    for w in per_word[:args.words]:
        print(f"  {w['word']:<20} " + " ".join(f"{m}={'hit' if w[m] else '-'}" for m in result["modes"]))
    return result


if __name__ == "__main__":
    main()
