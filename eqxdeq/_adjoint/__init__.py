from ._backward import BackwardStats as BackwardStats
from .implicit import ImplicitAdjoint as ImplicitAdjoint
from .jfb import JFB as JFB
from .phantom import PhantomAdjoint as PhantomAdjoint
from .reversible import ReversibleAdjoint as ReversibleAdjoint
from .shine import ShineAdjoint as ShineAdjoint
