"""Client training strategies (robustness methods), selected by ``client.strategy`` in a scenario."""

from .base import CLIENT_STRATEGIES, Batch, ClientData, ClientTrainer, TrainContext, TrainTask
from .beta_vae import BetaVAE
from .coral import CORAL
from .dann import DANN
from .ema_teacher import EMATeacher
from .erm import ERM
from .fish import Fish
from .gpm import GPM
from .gradvac import GradVac
from .head2toe import Head2Toe
from .hessian_trace import HessianTrace
from .irm import IRM
from .jtt import JTT
from .lpft import LPFT
from .mixup import Mixup
from .paint import PAINT
from .peft import AdapterTuning, LoRA
from .prefix import PrefixTuning
from .sam import SAM

__all__ = ["CLIENT_STRATEGIES", "ERM", "Batch", "ClientData", "ClientTrainer", "TrainContext", "TrainTask",
           "CORAL", "DANN", "GPM", "IRM", "JTT", "SAM", "Fish", "GradVac", "HessianTrace", "Mixup",
           "AdapterTuning", "BetaVAE", "EMATeacher", "Head2Toe", "LoRA", "LPFT", "PAINT", "PrefixTuning"]
