"""DKIM signing speed in one process: ``libs.providers.dkim`` (OpenSSL through ``cryptography``) against dkimpy.

Prints, as medians of ``--runs`` runs of ``--seconds`` each, signing a 20 KB MIME message (a text and an HTML part,
as a newsletter is) with a fresh key:

- ``dkim.signs_per_s``: RSA-2048, ``rsa-sha256``, relaxed/relaxed, the whole message canonicalized and hashed per
  signature (the headline; target ≥ 1,000 per process: the send path runs at ~2,000 emails/s on two cores);
- ``dkim.ed25519_signs_per_s``: the same with an Ed25519 key;
- ``dkim.dkimpy_signs_per_s``: dkimpy's ``dkim.sign`` on the same message and RSA key, in the same run — the
  baseline a pure-Python RSA gives, and the machine's speed of the day for this CPU-bound figure;
- ``dkim.signs_per_s_vs_dkimpy``: the headline over that baseline;
- ``dkim.openssl_rsa_signs_per_s``: the bare RSA-2048 private-key operation (``cryptography``, 32 bytes signed),
  alternating with the others: what bounds the headline on the day's CPU (a DKIM signature is one such operation
  plus canonicalization and hashing), and ``dkim.signs_per_s_vs_openssl_rsa`` the headline's share of it.

The gRPC floor (``bench.floor``) is measured first, as every benchmark does, and the headline printed against it.

Run: ``make bench BENCH=dkim`` (``BENCH_ARGS="--runs 5"``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bench import floor as floors
from libs.providers.dkim import DkimKey, generate_key, sign
from libs.providers.mime import build_mime
from libs.providers.model import Address, OutboundEmail

MESSAGE_BYTES = 20_000


def message() -> bytes:
    """A ~20 KB newsletter as the MIME encoder lays it out (text and HTML alternatives)."""
    paragraph = "Our winter sale starts now: every item in the shop is reduced, while stock lasts. "
    text = "\n\n".join(paragraph * 3 for _ in range(25))
    html = "".join(f"<p>{paragraph * 3}</p>\n" for _ in range(50))
    email = OutboundEmail(message_id="m-bench", tenant_id="acme", message_class="bulk",
                          sender=Address("news@mail.example.com", "News"), to=(Address("ada@example.org"),),
                          subject="Winter sale", text=text, html=html)
    raw = b"".join(s for s in build_mime(email).segments if isinstance(s, bytes))
    return raw[:MESSAGE_BYTES] if len(raw) > MESSAGE_BYTES * 1.5 else raw


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``operation`` run back to back for about ``seconds``."""
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(10):
            operation()
        done += 10
    return done / elapsed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    options = parser.parse_args(argv)
    floor = floors.measure()
    raw = message()
    rsa_pem, rsa_record = generate_key("rsa-sha256")
    ed_pem, _ = generate_key("ed25519-sha256")
    rsa_key = DkimKey("mail.example.com", "bench", rsa_pem)
    ed_key = DkimKey("mail.example.com", "bench", ed_pem)
    signed = sign(raw, rsa_key)
    if not dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: rsa_record.encode()):
        raise SystemExit("the benchmark's own signature does not verify")
    bare = load_pem_private_key(rsa_pem, password=None)
    assert isinstance(bare, rsa.RSAPrivateKey)
    samples: dict[str, list[float]] = {"dkim.signs_per_s": [], "dkim.ed25519_signs_per_s": [],
                                       "dkim.dkimpy_signs_per_s": [], "dkim.openssl_rsa_signs_per_s": []}
    for _ in range(options.runs):  # alternating, so a slow minute hits all three alike
        samples["dkim.signs_per_s"].append(rate(lambda: sign(raw, rsa_key), options.seconds))
        samples["dkim.ed25519_signs_per_s"].append(rate(lambda: sign(raw, ed_key), options.seconds))
        samples["dkim.dkimpy_signs_per_s"].append(rate(
            lambda: dkimpy.sign(raw, b"bench", b"mail.example.com", rsa_pem,
                                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]),
            options.seconds))
        samples["dkim.openssl_rsa_signs_per_s"].append(rate(
            lambda: bare.sign(b"0" * 32, padding.PKCS1v15(), hashes.SHA256()), options.seconds))
    results = floors.median_figures(samples, {name: "1/s" for name in samples}, {"dkim.signs_per_s": 1000},
                                    digits={name: 0 for name in samples})
    results.append({"metric": "dkim.message_bytes", "value": len(raw), "unit": "B"})
    ratios = [ours / baseline for ours, baseline in zip(samples["dkim.signs_per_s"],
                                                        samples["dkim.dkimpy_signs_per_s"], strict=True)]
    results.append({"metric": "dkim.signs_per_s_vs_dkimpy", "value": round(statistics.median(ratios), 2),
                    "unit": "1", "runs": [round(r, 2) for r in ratios]})
    shares = [ours / bound for ours, bound in zip(samples["dkim.signs_per_s"],
                                                  samples["dkim.openssl_rsa_signs_per_s"], strict=True)]
    results.append({"metric": "dkim.signs_per_s_vs_openssl_rsa", "value": round(statistics.median(shares), 2),
                    "unit": "1", "runs": [round(r, 2) for r in shares]})
    floors.print_figures(results, floor, {"dkim.signs_per_s": "grpc"})


if __name__ == "__main__":
    main()
