"""Offline speech synthesis with espeak-ng, called as a shared library through ctypes.

espeak-ng (https://github.com/espeak-ng/espeak-ng) is a compact formant synthesiser: no model weights,
more than 100 languages, far faster than real time on one core (BENCHMARKS.md, "Speech synthesis for
spoken captions"), with a robotic but clear voice. That is what ``spoken_captions`` needs to turn
image captions into paired speech offline. The ``espeakng-loader`` wheel ships ``libespeak-ng`` and
its voice data; this module calls the C API of ``speak_lib.h`` in synchronous mode and collects the
16-bit samples its callback hands over (22,050 Hz, mono).

Licence: espeak-ng is GPL-3.0-or-later and stele is Apache-2.0, so espeak-ng stays an optional extra
(``pip install 'stele[tts]'``). Nothing of it is vendored; the user's own installation is loaded at run
time, in a helper process, and importing this module does not need it.

Why a helper process: espeak-ng keeps synthesis state in C statics that no API call resets (the phase
of its pitch "flutter" table, the glottal phase, the random generator), so in one long-lived library
the same text comes out a few samples different depending on what was spoken before, and Ray workers
speak in no fixed order. Unloading and reloading the library per call does reset it, but
``espeak_Terminate`` leaks what it does not free (a German voice meeting an English word loses
memory at every call). So the first call starts a small helper (this file run as a script, standard library only),
which loads and initialises espeak-ng once and then forks a child for every request: the child
starts from the pristine initialised state, speaks, sends the samples back and exits, taking
whatever it allocated with it. A clip thus depends on ``(text, voice, rate, pitch, seed, jitter)``
alone, for a small fixed cost of fork and voice loading per call (``bench/tts_throughput.py``). One
helper per process (a forked process, a PyTorch DataLoader worker say, starts its own), one request
at a time (a module lock); Ray Data runs one process per CPU. POSIX only (``fork``).
"""

from __future__ import annotations

import atexit
import ctypes
import difflib
import hashlib
import json
import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from pipeline.datasets import AudioClip

INSTALL_HINT = "pip install 'stele[tts]'"
RATE_RANGE = (80, 450)     # words per minute espeak-ng honours (espeakRATE_MINIMUM / MAXIMUM)
PITCH_RANGE = (0, 100)     # espeak-ng's pitch scale; 50 is the voice's normal pitch
# Characters per word for the length estimate of a text before it is spoken. espeak-ng's words per
# minute come to about 6 characters a word on English prose, and no caption-like text we measured
# (prose, short words, capitals, compounds, punctuation, at 80 to 450 words per minute) exceeded 7,
# so with 8 the estimate stays below the real duration of such text: only a text far too long is
# refused unspoken. Degenerate text (one letter repeated thousands of times) speaks faster than the
# estimate; text slower than it (digits read out as numbers) is caught by the cap during synthesis.
FAST_CHARS_PER_WORD = 8

# ------------------------------------------------------------------------------------------------
# The helper process: runs this file as a script, so only the standard library is imported here.

# Constants of speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000   # report a missing data folder instead of calling exit()
_RATE, _PITCH = 1, 3             # espeak_PARAMETER
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0


class _Voice(ctypes.Structure):
    """``espeak_VOICE``; ``languages`` is a run of (priority byte, NUL-terminated name) pairs ended
    by a 0 byte."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p),
                ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte),
                ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int),
                ("spare", ctypes.c_void_p)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.c_void_p)


def _open_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    return lib


def _voice_list(lib: ctypes.CDLL) -> list[dict]:
    out = []
    array = lib.espeak_ListVoices(None)
    i = 0
    while array[i]:
        v = array[i].contents
        languages, p = [], v.languages
        while ctypes.c_ubyte.from_address(p).value:  # priority byte; 0 ends the list
            name = ctypes.string_at(p + 1)
            languages.append(name.decode())
            p += len(name) + 2
        out.append({"name": v.name.decode(), "identifier": v.identifier.decode(),
                    "languages": languages})
        i += 1
    return out


def _set_voice(lib: ctypes.CDLL, voice: str) -> None:
    if lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
        return
    # By name espeak-ng finds voice names and files ("en-us", "gmw/en-US", "English (America)"); a
    # language code that only appears in a voice's language list ("en-gb") is found by properties.
    known = _voice_list(lib)
    if any(voice.lower() in v["languages"] for v in known):
        language = ctypes.create_string_buffer(voice.lower().encode())
        spec = _Voice(languages=ctypes.addressof(language))
        if lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) == _EE_OK:
            return
    names = sorted({lang for v in known for lang in v["languages"]}
                   | {v["identifier"].rsplit("/", 1)[-1].lower() for v in known})
    close = difflib.get_close_matches(voice.lower(), names, n=4)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else "e.g. 'en-us', 'de', 'fr'; "
    raise ValueError(f"unknown espeak-ng voice {voice!r}: {hint}speech.tts.list_voices() lists all "
                     f"{len(known)}")


def _message(header: dict, body: bytes = b"") -> bytes:
    """One reply: a JSON header line (with the body's length) and the body."""
    return json.dumps({**header, "bytes": len(body)}).encode() + b"\n" + body


def _answer(lib: ctypes.CDLL, request: dict, chunks: list[bytes], budget: dict, sample_rate: int
            ) -> bytes:
    try:
        if request["op"] == "voices":
            return _message({"ok": True, "voices": _voice_list(lib)})
        _set_voice(lib, request["voice"])
        if request["op"] == "check":
            return _message({"ok": True})
        lib.espeak_SetParameter(_RATE, request["rate"], 0)
        lib.espeak_SetParameter(_PITCH, request["pitch"], 0)
        text = request["text"].encode("utf-8") + b"\0"
        max_seconds = request.get("max_seconds")
        budget["left"] = None if max_seconds is None else int(max_seconds * sample_rate)
        rc = lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if budget["left"] is not None and budget["left"] < 0:  # the callback stopped it
            raise ValueError(f"caption of {len(request['text'])} characters speaks for longer than "
                             f"max_seconds={max_seconds:g}; synthesis stopped at the limit")
        if rc != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed (error {rc})")
        lib.espeak_Synchronize()
        return _message({"ok": True, "sample_rate": sample_rate}, b"".join(chunks))
    except ValueError as e:
        return _message({"ok": False, "error": str(e), "value_error": True})
    except Exception as e:  # noqa: BLE001 - whatever it is, the caller gets it as a message
        return _message({"ok": False, "error": f"{type(e).__name__}: {e}"})


def _serve(lib_path: str, data_path: str) -> None:
    """The helper's loop: one JSON request a line on stdin, one reply each on stdout."""
    out: BinaryIO = sys.stdout.buffer
    lib = _open_library(lib_path)
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(),
                                        _INITIALIZE_DONT_EXIT)
    if sample_rate <= 0:
        out.write(_message({"ok": False, "error": f"espeak-ng did not initialise (data folder "
                                                  f"{data_path})"}))
        out.flush()
        return
    # The voice list is read from ~140 files; read once here, every child inherits it.
    lib.espeak_ListVoices(None)
    chunks: list[bytes] = []
    budget: dict = {"left": None}  # samples a request may still produce (None: no limit)

    def collect(wav, n: int, events) -> int:
        if wav and n > 0:
            if budget["left"] is not None:
                budget["left"] -= n
                if budget["left"] < 0:
                    return 1  # 1: abort, so an overlong text costs at most max_seconds of speech
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0: go on synthesising

    callback = _SynthCallback(collect)  # a local name keeps it alive as long as the loop
    lib.espeak_SetSynthCallback(callback)
    out.write(_message({"ok": True, "sample_rate": sample_rate}))
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: speaks from the pristine state, answers, exits
            try:
                os.close(r)
                with os.fdopen(w, "wb") as f:
                    f.write(_answer(lib, request, chunks, budget, sample_rate))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            reply = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not reply:
            text = request.get("text") or ""  # the start of it: the reason stays one line
            reply = _message({"ok": False, "error": f"espeak-ng crashed on {text[:80]!r}"
                                                    f"{'...' if len(text) > 80 else ''} "
                                                    f"(wait status {status})"})
        out.write(reply)
        out.flush()


# ------------------------------------------------------------------------------------------------
# The client side, in the process that wants speech.

class _Helper:
    """The helper process and its pipes."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:
            raise ImportError(f"speech synthesis needs espeak-ng, an optional extra because it is "
                              f"GPL-3: {INSTALL_HINT}") from None
        # -I: standard library only, and this file's folder (speech/, which has an io.py) is not put
        # on the helper's path.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), espeakng_loader.get_library_path(),
             espeakng_loader.get_data_path()], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = os.getpid()
        atexit.register(self.close)
        self.sample_rate = self._read()[0]["sample_rate"]

    def _read(self) -> tuple[dict, bytes]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the espeak-ng helper process exited (code {self.proc.wait()})")
        header = json.loads(line)
        body = self.proc.stdout.read(header["bytes"])
        if not header["ok"]:
            raise (ValueError if header.get("value_error") else RuntimeError)(header["error"])
        return header, body

    def ask(self, request: dict) -> tuple[dict, bytes]:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # a broken pipe: the helper is gone; _read says how it ended
            pass
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the helper's loop ends at end of input
            self.proc.wait(timeout=10)


_LOCK = threading.Lock()
_HELPER: _Helper | None = None


def _ask(request: dict) -> tuple[dict, bytes]:
    """One request to the process's helper, started on first use and again if it died."""
    global _HELPER
    with _LOCK:
        # a forked copy of this process must not share its parent's pipes
        if _HELPER is None or _HELPER.pid != os.getpid() or _HELPER.proc.poll() is not None:
            _HELPER = _Helper()
        return _HELPER.ask(request)


def list_voices() -> list[dict]:
    """Every voice of the installed espeak-ng: ``name``, ``identifier`` and ``languages``."""
    return _ask({"op": "voices"})[0]["voices"]


def check_voice(voice: str) -> None:
    """Raise ``ValueError`` if espeak-ng has no voice ``voice`` (``ImportError`` without espeak-ng)."""
    _ask({"op": "check", "voice": voice})


def _jittered(text: str, rate: int, pitch: int, seed: int | None, jitter: float) -> tuple[int, int]:
    """Rate and pitch each scaled by 1 + U(-jitter, jitter), drawn from a generator seeded by
    ``(seed, text)``: a dataset gets varied voices that come out the same on every run."""
    import numpy as np

    if jitter == 0:
        return rate, pitch
    entropy = None if seed is None else \
        [seed, int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")]
    u = np.random.default_rng(entropy).uniform(-jitter, jitter, size=2)
    return (int(np.clip(round(rate * (1 + u[0])), *RATE_RANGE)),
            int(np.clip(round(pitch * (1 + u[1])), *PITCH_RANGE)))


def estimate_seconds(text: str, rate: int) -> float:
    """How long ``text`` takes to say at ``rate`` words per minute, estimated from its length
    (whitespace runs count as one character) at :data:`FAST_CHARS_PER_WORD` characters a word: an
    estimate on the short side for real text, for refusing overlong text before it is spoken."""
    return len(" ".join(text.split())) / FAST_CHARS_PER_WORD / rate * 60.0


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
               seed: int | None = None, jitter: float = 0.0,
               max_seconds: float | None = None) -> AudioClip:
    """``text`` spoken by espeak-ng: int16 mono samples at 22,050 Hz.

    ``voice`` is an espeak-ng voice or language (``en-us``, ``en-gb``, ``de``, ``en-us+f3`` for a
    variant); ``rate`` in words per minute (80 to 450), ``pitch`` 0 to 100. With ``jitter`` > 0 the rate
    and pitch of each call are scaled by ``1 + U(-jitter, jitter)``, drawn from ``(seed, text)``: the
    same text and seed always give identical samples (``seed=None`` draws fresh randomness instead).

    ``max_seconds`` bounds the speech: a text whose :func:`estimate_seconds` (at its jittered rate)
    exceeds it raises ``ValueError`` before anything is synthesised, and synthesis of any other text
    stops with a ``ValueError`` once its speech passes the limit, so a runaway caption never costs
    more than ``max_seconds`` of audio.
    """
    # Imported here rather than at the top: the helper runs this file with the standard library only.
    import numpy as np

    from pipeline.datasets import AudioClip

    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty text, nothing to synthesise")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"rate {rate} is outside espeak-ng's {RATE_RANGE[0]}..{RATE_RANGE[1]} "
                         f"words per minute")
    if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
        raise ValueError(f"pitch {pitch} is outside espeak-ng's {PITCH_RANGE[0]}..{PITCH_RANGE[1]}")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter {jitter} must be in [0, 1)")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds {max_seconds} must be positive")
    rate, pitch = _jittered(text, rate, pitch, seed, jitter)
    if max_seconds is not None and (estimate := estimate_seconds(text, rate)) > max_seconds:
        raise ValueError(f"caption of {len(text)} characters would speak for about {estimate:.0f} s "
                         f"at {rate} words per minute, longer than max_seconds={max_seconds:g}; "
                         f"not synthesised")
    header, body = _ask({"op": "speak", "text": text, "voice": voice, "rate": rate, "pitch": pitch,
                         "max_seconds": max_seconds})
    if not body:
        raise ValueError(f"espeak-ng produced no audio for {text[:80]!r}")
    return AudioClip(samples=np.frombuffer(body, dtype=np.int16).copy(),
                     sample_rate=header["sample_rate"])


if __name__ == "__main__":
    _serve(*sys.argv[1:3])
