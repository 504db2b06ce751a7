"""Speech-synthesis throughput of ``speech.tts`` (espeak-ng through ctypes), on one core.

Captions: the 1,911 emoji names of ``$STELE_DATA/emoji/emoji.json`` ("Red Apple", "Egypt Flag", ...)
when that file exists, else a built-in list of 50 short phrases. Each repeat speaks every caption once
with :func:`speech.tts.synthesize` (a fresh library per call, see its module docstring) and reports:

* real-time factor: seconds of audio produced per second of wall time (median over ``--repeats``);
* milliseconds per caption;
* the fixed cost of a call, without speech: :func:`speech.tts.check_voice` is one round trip to the
  espeak-ng helper, whose forked child loads the voice and answers (each synthesis pays this to start
  from espeak-ng's pristine state, see :mod:`speech.tts`);
* how clip duration follows caption length: Pearson r between characters and seconds, and the
  least-squares seconds per character (a caption that does not grow its clip would say the text was
  not spoken).

    STELE_DATA=/path/to/data python bench/tts_throughput.py
    python bench/tts_throughput.py --limit 200 --voice en-gb --rate 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from speech.tts import check_voice, synthesize

PHRASES = [
    "red apple", "a dog runs on the beach", "two cats asleep on a sofa", "the flag of Egypt",
    "a bowl of hot soup", "an old man reading a newspaper", "a yellow taxi in the rain",
    "children playing football in a park", "a bicycle leaning against a wall",
    "snow on the mountains", "a plate of spaghetti", "a woman holding an umbrella",
    "sunset over the sea", "a red double-decker bus", "a cup of coffee and a croissant",
    "an elephant crossing a river", "a laptop on a wooden desk", "fireworks over the city",
    "a boy flying a kite", "three ducks on a pond", "a train at the station",
    "a birthday cake with candles", "a horse in a green field", "a man riding a skateboard",
    "a bunch of bananas", "a lighthouse on the rocks", "a girl with a red balloon",
    "a busy market street", "an empty classroom", "a sailboat on a calm lake",
    "a pizza with olives", "a dog catching a frisbee", "a violin on a chair",
    "rain drops on a window", "a tiger resting in the shade", "a stack of books",
    "a chef cooking in a kitchen", "a bridge at night", "a pair of running shoes",
    "a field of sunflowers", "a cat watching birds", "a mountain bike on a trail",
    "an astronaut floating in space", "a basket of strawberries", "a tram in the old town",
    "a penguin on the ice", "a glass of orange juice", "a clock tower at noon",
    "a fisherman on a pier", "a hot air balloon over the valley",
]


def load_captions(path: Path | None) -> tuple[list[str], str]:
    if path is None:
        root = os.environ.get("STELE_DATA")
        path = Path(root) / "emoji" / "emoji.json" if root else None
    if path is None or not path.is_file():
        return PHRASES, f"{len(PHRASES)} built-in phrases"
    with open(path, encoding="utf-8") as f:
        names = [e["name"] for e in json.load(f) if isinstance(e, dict) and e.get("name")]
    return names, f"{len(names)} emoji names from {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="emoji.json (default $STELE_DATA/emoji/emoji.json, else built-in phrases)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--voice", default="en-us")
    ap.add_argument("--rate", type=int, default=175)
    args = ap.parse_args()

    captions, what = load_captions(args.data)
    captions = captions[:args.limit] if args.limit else captions
    if not captions:
        sys.exit("no captions")
    print(f"captions: {what}" + (f", first {len(captions)}" if args.limit else "")
          + f"; voice {args.voice}, rate {args.rate} wpm")

    synthesize(captions[0], voice=args.voice, rate=args.rate)  # starts the helper process
    walls, durations = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        clips = [synthesize(c, voice=args.voice, rate=args.rate) for c in captions]
        walls.append(time.perf_counter() - t)
        durations = [len(c.samples) / c.sample_rate for c in clips]
    t = time.perf_counter()
    for _ in range(len(captions)):
        check_voice(args.voice)
    fixed_ms = (time.perf_counter() - t) / len(captions) * 1e3

    audio_s = sum(durations)
    wall = statistics.median(walls)
    chars = np.array([len(c) for c in captions], dtype=float)
    secs = np.array(durations)
    r = float(np.corrcoef(chars, secs)[0, 1]) if len(captions) > 1 else float("nan")
    slope, intercept = np.polyfit(chars, secs, 1) if len(captions) > 1 else (float("nan"),) * 2

    print(f"\n{'captions':>10} {'audio s':>9} {'wall s (median)':>16} {'audio s / wall s':>17} "
          f"{'ms / caption':>13} {'fixed ms':>9}")
    print(f"{len(captions):>10} {audio_s:>9.1f} {wall:>16.2f} {audio_s / wall:>17.0f} "
          f"{wall / len(captions) * 1e3:>13.2f} {fixed_ms:>9.2f}")
    print(f"\nwall s of each repeat: {', '.join(f'{w:.2f}' for w in walls)}")
    print(f"caption length: {chars.mean():.1f} chars on average ({chars.min():.0f}.."
          f"{chars.max():.0f}); clip: {secs.mean():.2f} s on average ({secs.min():.2f}.."
          f"{secs.max():.2f})")
    print(f"duration vs length: Pearson r = {r:.3f}; {slope * 1e3:.1f} ms per character "
          f"+ {intercept:.2f} s")


if __name__ == "__main__":
    main()
