from ._deq import DEQ as DEQ, DEQStats as DEQStats
from ._dropout import (
    AbstractVariationalDropout as AbstractVariationalDropout,
    VariationalDropout as VariationalDropout,
    VariationalDropout1d as VariationalDropout1d,
    VariationalDropout2d as VariationalDropout2d,
    VariationalDropout3d as VariationalDropout3d,
    VariationalDropToken1d as VariationalDropToken1d,
    VariationalDropToken2d as VariationalDropToken2d,
    VariationalDropToken3d as VariationalDropToken3d,
)
from ._init import (
    AbstractInit as AbstractInit,
    half_normal_like as half_normal_like,
    HalfNormal as HalfNormal,
    Predictor as Predictor,
    Zeros as Zeros,
    zeros_like as zeros_like,
)
from ._mdeq import MultiscaleCell as MultiscaleCell
from ._norm import (
    apply_norm as apply_norm,
    remove_norm as remove_norm,
    reset_norm as reset_norm,
)
