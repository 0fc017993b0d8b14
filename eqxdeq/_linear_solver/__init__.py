from .neumann import Neumann as Neumann
from .richardson import Richardson as Richardson
