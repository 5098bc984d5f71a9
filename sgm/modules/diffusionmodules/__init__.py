"""Diffusion machinery of CogVideoX: schedule, denoiser, guidance, samplers, sigma sampling, loss."""
from sgm.modules.diffusionmodules.denoiser import Denoiser, DiscreteDenoiser
from sgm.modules.diffusionmodules.discretizer import ZeroSNRDDPMDiscretization
from sgm.modules.diffusionmodules.guiders import DynamicCFG, IdentityGuider, VanillaCFG
from sgm.modules.diffusionmodules.loss import StandardDiffusionLoss, VideoDiffusionLoss
from sgm.modules.diffusionmodules.sampling import (VideoDDIMSampler, VPODEDPMPP2MSampler,
                                                   VPSDEDPMPP2MSampler)
from sgm.modules.diffusionmodules.sigma_sampling import DiscreteSampling
from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper

__all__ = ["Denoiser", "DiscreteDenoiser", "ZeroSNRDDPMDiscretization", "DynamicCFG", "IdentityGuider",
           "VanillaCFG", "StandardDiffusionLoss", "VideoDiffusionLoss", "VideoDDIMSampler", "VPODEDPMPP2MSampler",
           "VPSDEDPMPP2MSampler", "DiscreteSampling", "OpenAIWrapper"]
