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
from ._norm import (
    apply_norm as apply_norm,
    remove_norm as remove_norm,
    reset_norm as reset_norm,
)
