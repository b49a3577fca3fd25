// cuemu stand-in for the CUDA runtime header: the emulator itself.
#pragma once
#include "../cuemu.h"
