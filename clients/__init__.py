"""Client training strategies (robustness methods), selected by ``client.strategy`` in a scenario."""

from .andmask import ANDMask, SANDMask
from .arm import ARM
from .base import CLIENT_STRATEGIES, Batch, ClientData, ClientTrainer, TrainContext, TrainTask
from .beta_vae import BetaVAE
from .cad import CAD, CondCAD
from .cagrad import CAG, GradBase
from .causirl import CausIRLCORAL, CausIRLMMD
from .cdann import CDANN
from .coral import CORAL
from .dann import DANN
from .ema_teacher import EMATeacher
from .eqrm import EQRM
from .erm import ERM
from .fediir import FedIIR
from .fedsr import FedSR
from .fish import Fish
from .fishr import Fishr
from .fourier_mixup import FourierMixup
from .gpm import GPM
from .gradvac import GradVac
from .groupdro import GroupDRO
from .head2toe import Head2Toe
from .hessian_trace import HessianTrace
from .ib import IBERM, IBIRM
from .iga import IGA
from .irm import IRM
from .jtt import JTT
from .lpft import LPFT
from .mixup import Mixup
from .mldg import MLDG
from .mmd import MMD
from .mtl import MTL
from .paint import PAINT
from .peft import AdapterTuning, LoRA
from .prefix import PrefixTuning
from .rsc import RSC
from .sagnet import SagNet
from .sam import SAM
from .sd import SD
from .selfreg import SelfReg
from .transfer import Transfer
from .trm import TRM
from .vrex import VREx

__all__ = ["CLIENT_STRATEGIES", "Batch", "ClientData", "ClientTrainer", "TrainContext", "TrainTask",
           "AdapterTuning", "ANDMask", "ARM", "BetaVAE", "CAD", "CAG", "CausIRLCORAL", "CausIRLMMD", "CDANN",
           "CondCAD", "CORAL", "DANN", "EMATeacher", "EQRM", "ERM", "FedIIR", "FedSR", "Fish", "Fishr",
           "FourierMixup", "GPM", "GradBase", "GradVac", "GroupDRO", "Head2Toe", "HessianTrace", "IBERM", "IBIRM",
           "IGA", "IRM", "JTT", "LoRA", "LPFT", "Mixup", "MLDG", "MMD", "MTL", "PAINT", "PrefixTuning", "RSC",
           "SagNet", "SAM", "SANDMask", "SD", "SelfReg", "Transfer", "TRM", "VREx"]
