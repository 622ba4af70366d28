"""Identity methods switched on one model: the second attach puts back what the first one built.

A renderer attaches one identity method at a time and switches when a batch asks for another (a replica serving
PuLID and IP-Adapter characters switches between their batches). Building a method's layers anew at every switch
cost a switch more than a tiny render (diffusers' ``load_ip_adapter`` reads and loads the adapter file again; at
full size that is a gigabyte), and under CUDA graphs it cost more: the new processors' weights and identity slots
(:mod:`imagegen.identity.fixed_address`) sit at new addresses, so the graphs of every identity block were recorded
again, and kept beside the old ones, at every switch.

So a handle's ``detach`` takes its processors and hooks off the model but keeps them, and ``reattach`` installs the
very same objects again: the same compiled graphs and their recordings serve the method after any number of
switches. A handle reattaches only while no other handle of its kind is on the model and, if its layers wrap or
replace attention processors, onto the very processors it was built around (:func:`can_reattach`); otherwise its
conditioner builds a new one.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def can_reattach(model: nn.Module, attached_attr: str, originals: Mapping[str, object] | None = None) -> bool:
    """Whether a detached handle may put its layers back on ``model``: no handle of its kind is attached there
    (``attached_attr`` unset) and, given ``originals``, the model's attention processors are still those very
    objects (what the handle's layers wrap or stand in for: layers built around replaced processors would call stale
    ones)."""
    if getattr(model, attached_attr, None) is not None:
        return False
    if originals is None:
        return True
    current = model.attn_processors
    return current.keys() == originals.keys() and all(current[name] is originals[name] for name in originals)


__all__ = ["can_reattach"]
