// The regext operator library: TORCH_LIBRARY(regext) with every schema.
#include "schemas.h"

TORCH_LIBRARY(regext, m) { regext::define_operators(m); }
