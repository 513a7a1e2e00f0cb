"""Generate the support-ticket routing dataset used by the quickstart, `make demo` and the tests.

Each example is a customer message and the queue it belongs to (e.g.
``BILLING/REFUND``). A small base model cannot route these from a few
examples in its prompt; a small adapter learns it: the demo shows a
fine-tune beating its prompted baseline, as a fine-tune that ships must.

The training file deliberately carries the faults curation exists for: exact
and near duplicates, an invalid line, an empty response, and copies of
held-out eval examples (leakage). There are two held-out files:
``heldout.jsonl`` reuses the training tickets' wordings, ``heldout-reworded.jsonl``
(what ``make demo`` evaluates on) asks in wordings no training ticket uses. Run
``python generate.py`` to rewrite the files; the output is deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUEUES: dict[str, list[str]] = {
    "BILLING/REFUND": [
        "I was charged twice for {item} and want my money back",
        "please refund the {item} I returned last week",
        "there is a double charge for {item} on my card",
        "I cancelled {item} but still paid for it, refund please",
    ],
    "BILLING/INVOICE": [
        "I need an invoice for {item} with our company address",
        "the receipt for {item} shows the wrong billing address",
        "can you send a copy of the invoice for order {order}",
        "our accounting team needs a VAT invoice for {item}",
    ],
    "ACCOUNT/PASSWORD": [
        "I forgot my password and the reset email never arrives",
        "I cannot log in, the password reset link has expired",
        "my login fails after I changed my password yesterday",
        "please help me reset the password of my account",
    ],
    "ACCOUNT/DELETE": [
        "please delete my account and all my data",
        "I want to close my account permanently",
        "how do I remove my profile and personal data for good",
        "cancel my membership and erase my account",
    ],
    "SHIPPING/DELAY": [
        "where is my order {order}, it is a week late",
        "the tracking for {item} has not moved for days",
        "my package with {item} still has not arrived",
        "order {order} was due on {day} and never came",
    ],
    "SHIPPING/DAMAGED": [
        "the {item} arrived broken in a crushed box",
        "my {item} was damaged during delivery",
        "the box for order {order} came wet and the {item} is cracked",
        "I received a scratched and dented {item}",
    ],
    "PRODUCT/BUG": [
        "the app crashes every time I open the {item} page",
        "I get an error message when I pay for {item}",
        "the {item} screen freezes after the last update",
        "search shows no results for {item} although it is in stock",
    ],
    "PRODUCT/FEATURE": [
        "it would be great if the app had a dark mode for {item}",
        "please add an option to export my {item} history",
        "could you support paying for {item} in instalments",
        "I would love a wishlist where I can save {item}",
    ],
}
# Wordings that no training ticket uses, for ``heldout-reworded.jsonl``: the same queues asked the
# way a customer who never saw the training tickets would. ``heldout.jsonl`` draws on the templates
# above, so its tickets differ from training ones only in greeting, item and sign-off, and a prompt
# that retrieves the nearest training tickets copies their answer (it scores like a lookup table).
REWORDED: dict[str, list[str]] = {
    "BILLING/REFUND": [
        "{item} went back to you ten days ago and I am still waiting for the money",
        "I paid two times for {item}, please return one of the payments",
        "my bank shows a payment for {item} that I never received, I want it reversed",
    ],
    "BILLING/INVOICE": [
        "our finance department asks for a proper bill for {item}",
        "please put our company name and tax number on the paperwork for order {order}",
        "the bill for {item} is missing our VAT number",
    ],
    "ACCOUNT/PASSWORD": [
        "the code to sign in never comes and I am locked out",
        "my old password is not accepted any more and the link to change it is broken",
        "how can I get back into my account without my password",
    ],
    "ACCOUNT/DELETE": [
        "I no longer want to use your service, get rid of my profile",
        "please wipe every personal detail you hold about me and shut my account",
        "under GDPR I ask you to erase everything you store about me",
    ],
    "SHIPPING/DELAY": [
        "the delivery of {item} is overdue and nobody tells me when it comes",
        "order {order} still says in transit after two weeks",
        "I have been waiting since {day} for {item} to turn up",
    ],
    "SHIPPING/DAMAGED": [
        "{item} came smashed, the parcel was torn open",
        "when I unpacked {item} it was in pieces",
        "order {order} was delivered but {item} inside is bent and unusable",
    ],
    "PRODUCT/BUG": [
        "the checkout for {item} keeps failing with a blank page",
        "since the new version the app closes whenever I look at {item}",
        "adding {item} to the basket does nothing, the button seems dead",
    ],
    "PRODUCT/FEATURE": [
        "it would help to get a price alert for {item}",
        "I suggest you let customers compare {item} side by side",
        "please consider offering gift wrapping for {item}",
    ],
}
# More ways to ask, for the training tickets only (``heldout.jsonl`` and ``val.jsonl`` keep to the
# templates above). Four wordings a queue taught a 135M model the templates rather than the queues:
# on ``heldout-reworded.jsonl`` it routed 0.78-0.83 of the tickets; with these eight, 0.91.
MORE: dict[str, list[str]] = {
    "BILLING/REFUND": [
        "the {item} was faulty so I sent it back, when do I get the refund",
        "you took money for {item} twice this month",
        "I was overcharged for {item}, please pay the difference back",
        "my refund for order {order} has not reached my account",
    ],
    "BILLING/INVOICE": [
        "the invoice for order {order} has a typo in our company name",
        "please email me the invoice for {item} as a PDF",
        "I cannot find the invoice for {item} in my account",
        "can the invoice for {item} be made out to my employer",
    ],
    "ACCOUNT/PASSWORD": [
        "the password reset page says my email is unknown",
        "I keep getting wrong password although I typed it correctly",
        "I need a new password, I cannot remember mine",
        "my account got locked after three wrong password attempts",
    ],
    "ACCOUNT/DELETE": [
        "I am leaving, please close my account and remove my details",
        "delete my customer account, I will not shop here again",
        "remove all my personal information and deactivate my account",
        "I want my account gone for good together with my order history",
    ],
    "SHIPPING/DELAY": [
        "my {item} was supposed to come on {day} but there is no sign of it",
        "the courier keeps postponing the delivery of order {order}",
        "it has been ten days and {item} is still not here",
        "when will {item} finally be delivered, it is very late",
    ],
    "SHIPPING/DAMAGED": [
        "the {item} in order {order} arrived with a big crack",
        "the parcel was crushed and {item} is broken",
        "{item} was delivered damaged and does not work",
        "half of {item} was shattered when the box arrived",
    ],
    "PRODUCT/BUG": [
        "the page for {item} shows an error and will not load",
        "the app freezes when I try to pay for {item}",
        "I cannot add a review for {item}, the form throws an error",
        "the price of {item} shows as zero in the app, looks like a bug",
    ],
    "PRODUCT/FEATURE": [
        "I wish I could get a notification when {item} is back in stock",
        "could you add a size guide for {item}",
        "it would be nice to pay for {item} with a gift card",
        "please let me save {item} in a list for later",
    ],
}
TRAIN_WORDINGS = {q: QUEUES[q] + MORE[q] for q in QUEUES}
ITEMS = [
    "the blue kettle",
    "a desk lamp",
    "the winter jacket",
    "two coffee mugs",
    "the running shoes",
    "a phone case",
    "the garden chair",
    "my headphones",
    "the yoga mat",
    "a backpack",
    "the toaster",
    "a set of towels",
    "the bike light",
    "a wool scarf",
    "the monitor stand",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
OPENERS = ["", "Hi, ", "Hello, ", "Good morning, ", "Hey team, ", "Dear support, "]
CLOSERS = ["", " Thanks.", " Thank you!", " Regards, Sam", " Please help.", " Cheers"]


def ticket(rng: random.Random, queue: str, wordings: dict[str, list[str]] = QUEUES) -> dict[str, str]:
    body = rng.choice(wordings[queue]).format(
        item=rng.choice(ITEMS), order=f"#{rng.randint(10000, 99999)}", day=rng.choice(DAYS)
    )
    text = rng.choice(OPENERS) + body + "." + rng.choice(CLOSERS)
    return {"prompt": "Route this support ticket: " + text[0].upper() + text[1:], "response": queue}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    rng = random.Random(7)
    queues = sorted(QUEUES)
    out = Path(__file__).parent
    heldout = [ticket(rng, queues[i % len(queues)]) for i in range(96)]
    validation = [ticket(rng, queues[i % len(queues)]) for i in range(48)]
    train = [ticket(rng, rng.choice(queues), TRAIN_WORDINGS) for _ in range(560)]
    # The faults curation is for: duplicates, near-duplicates, leakage, broken records.
    train += [dict(t) for t in rng.sample(train, 20)]
    near = []
    for t in rng.sample(train, 10):
        near.append({"prompt": t["prompt"].replace("Route this", "Please route this"), "response": t["response"]})
    train += near
    train += [dict(t) for t in rng.sample(heldout, 8)]
    rng.shuffle(train)
    lines = [json.dumps(t) for t in train]
    lines.insert(37, '{"prompt": "Route this support ticket: my order is late", "response": "..."}')
    lines.insert(120, '{"prompt": "Route this support ticket: broken json", "response": "SHIPPING/DELAY"')
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(out / "val.jsonl", validation)
    write_jsonl(out / "heldout.jsonl", heldout)
    # Its own generator, so that the files above stay as they were before it existed.
    rng = random.Random(11)
    reworded = [ticket(rng, queues[i % len(queues)], REWORDED) for i in range(96)]
    write_jsonl(out / "heldout-reworded.jsonl", reworded)


if __name__ == "__main__":
    main()
