from .jacobian import (
    AbstractJacobianDescent as AbstractJacobianDescent,
    NewtonKrylovDescent as NewtonKrylovDescent,
)
from .residual import (
    AndersonDescent as AndersonDescent,
    BroydenDescent as BroydenDescent,
    PicardDescent as PicardDescent,
)
