"""Guidance: combine a main denoiser with a guiding denoiser into one denoiser callable.

Source: Karras, Aittala, Kynkaanniemi, Lehtinen, Aila, Laine (2024), "Guiding a diffusion model with a bad
version of itself" (autoguidance, NeurIPS 2024), Eq. 2: with a main model D_1 and a guiding model D_0,

    D_w(x; sigma, c) = D_0(x; sigma, c) + w * (D_1(x; sigma, c) - D_0(x; sigma, c))

``w = 1`` gives D_1, ``w = 0`` gives D_0, ``w > 1`` extrapolates away from the guide.  For autoguidance D_0 is
a smaller / less trained version of D_1 with the same conditioning (DDO's EDM2-L uses the EDM2-XS net
``edm2-img512-xs-0134217-0.165`` with w = 1.1); with an unconditional D_0 the same formula is
classifier-free guidance (an unconditional EDM2 net ignores the labels it is given).

Samplers never import this module: :func:`autoguidance` returns a plain ``denoise(x, sigma, labels)``
callable, the package's model contract, which any sampler takes in place of a single network.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["autoguidance"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def autoguidance(net: Denoiser, gnet: Denoiser, w: float) -> Denoiser:
    """The guided denoiser ``D(x, sigma, labels) = gnet(...) + w * (net(...) - gnet(...))``.

    ``net`` is the main model and ``gnet`` the guide, both called as ``f(x, sigma, labels)`` with the same
    arguments (e.g. :class:`repro.nets.edm2.Precond` instances).  The blend is ``torch.lerp(g, d, w)``
    in the dtype of ``net``'s output, which is exact at the end points: ``w == 1`` returns ``net``'s output
    and ``w == 0`` returns ``gnet``'s (only that one network is evaluated then, so an unguided run costs
    one network evaluation per call).

    Example::

        denoise = autoguidance(net_l, net_xs, w=1.1)
        images = edm_sampler(denoise, latents, labels, num_steps=32)
    """
    w = float(w)

    def guided(x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if w == 1.0:
            return net(x, sigma, labels)
        if w == 0.0:
            return gnet(x, sigma, labels)
        d = net(x, sigma, labels)
        g = gnet(x, sigma, labels)
        return torch.lerp(g.to(d.dtype), d, w)

    guided.w = w  # type: ignore[attr-defined]
    guided.__doc__ = f"autoguidance(net, gnet, w={w}): gnet + w * (net - gnet)"
    return guided
