"""The identity contract of the pipelines: how a render gets per-sample conditioning, from whom.

The pipelines know nothing of characters, registries or approval. A ``Renderer`` is given an
``IdentityProvider`` (the identity package implements one over its registry) and asks it for
two things: a ``Conditioner`` by method name (loaded once per pipeline, then attached, used and
detached by the renderer), and the conditioning tensors of a character for that conditioner.
diffusers keeps its pipelines ignorant of where embeddings come from the same way
(``ip_adapter_image_embeds``); here the tensors are per sample, so one batch may mix characters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from imagegen.pipelines.presets import Preset
from imagegen.pipelines.profiles import Profile, ProfileError

#: a character's conditioning tensors (CPU tensors; the conditioner moves what it needs)
Tensors = dict[str, torch.Tensor]


@dataclass
class IdentitySample:
    """The identity of one sample of a batch; ``tensors`` None (and weight 0) for a sample without one."""

    tensors: Tensors | None
    weight: float
    start_step: int = 0


@dataclass
class BatchConditioning:
    """What a conditioner adds to one pipeline call."""

    #: extra keyword arguments for the pipeline call
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: called after every denoising step (``callback_on_step_end`` signature); None when not needed
    on_step_end: Callable | None = None
    #: ``select_rows(active)``: from the next denoiser call on, only the samples ``active`` (indices into the batch
    #: as given, in order) are computed; the others were cancelled (``imagegen.pipelines.cancel``). None: the
    #: conditioning cannot narrow, so a batch it adds anything to keeps every row to the end of the call
    select_rows: Callable[[Sequence[int]], None] | None = None

    @property
    def rows_can_leave(self) -> bool:
        """Cancelled rows may leave the denoiser mid-call: the conditioning narrows with them, or adds nothing."""
        return self.select_rows is not None or (not self.kwargs and self.on_step_end is None)


class Conditioner(ABC):
    """Puts per-sample identity into a loaded pipeline: attach once, condition batches, detach exactly.

    Optional: ``example_tensors()``, a character's conditioning tensors of the right shapes and dtypes made up
    without any reference image (random numbers of a fixed seed). A serving replica's warm-up
    (``imagegen.pipelines.warmup``) renders one identity sample with them before it takes traffic, so the identity
    path is traced and compiled at start under a compiling profile rather than by the first caller. Conditioners
    without it (the attribute left None) are loaded at warm-up but not rendered.
    """

    #: the name presets and requests use, e.g. "pulid-flux-v0.9.1"
    name: ClassVar[str]
    #: the pipeline family it works with ("flux" / "sdxl")
    family: ClassVar[str]

    @property
    @abstractmethod
    def weights_hash(self) -> str:
        """Identifies the weights in use (tensors computed with other weights do not fit)."""

    #: step caches (``StepCacheOptions.kind``) this method was shown to honour: a skipped step neither drops nor
    #: repeats its identity contribution (tests/identity_profiles/test_profiles.py checks each one claimed)
    step_caches: ClassVar[frozenset[str]] = frozenset()

    def check_profile(self, profile: Profile) -> None:
        """Refuse (``ProfileError``) an optimisation profile under which this method cannot keep identity exact.

        Compile, quantisation of the denoiser, attention backends, memory format and offload leave the identity
        modules as they are; a step cache skips computation the identity hooks may sit in, so only the caches a
        method lists in ``step_caches`` are accepted.
        """
        cache = profile.step_cache
        if cache is not None and cache.kind not in self.step_caches:
            honoured = ", ".join(sorted(self.step_caches)) or "none"
            raise ProfileError(
                f"identity method '{self.name}' cannot keep its identity contribution under the {cache.kind} step "
                f"cache of profile '{profile.name}' (step caches it honours: {honoured}); choose a profile without "
                "it for this method, e.g. 'fast'"
            )

    #: ``example_tensors() -> Tensors`` (see the class docstring); None: this conditioner offers none
    example_tensors: ClassVar[Callable[[], Tensors] | None] = None

    @abstractmethod
    def attach(self, pipe) -> None:
        """Install the layers or hooks on ``pipe`` (once per loaded pipeline)."""

    @abstractmethod
    def detach(self, pipe) -> None:
        """Remove everything ``attach`` installed; the pipeline renders as if never attached."""

    @abstractmethod
    def conditioning(
        self, pipe, samples: list[IdentitySample], cfg: bool = False
    ) -> AbstractContextManager[BatchConditioning]:
        """Condition the pipeline calls made inside the ``with`` block on ``samples``.

        ``cfg``: the pipeline runs a negative pass too (SDXL CFG, FLUX true CFG); the conditioner
        gives it the unconditional identity.
        """


class IdentityProvider(Protocol):
    """Where a renderer's identity comes from; owns method choice, character lookup and policy."""

    def resolve_method(self, preset: Preset, requested: str | None) -> str:
        """The method a request naming ``requested`` (None: the preset's default) gets on ``preset``."""
        ...

    def load(self, name: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> Conditioner:
        """The conditioner ``name`` for a pipeline of ``preset`` on ``device`` / ``dtype`` (not attached)."""
        ...

    def tensors_for(self, character: str, conditioner: Conditioner, version: int | None = None) -> Tensors:
        """``character``'s tensors for ``conditioner``; raises when it may not be rendered (unknown, draft, or not
        at ``version`` when one is given)."""
        ...
