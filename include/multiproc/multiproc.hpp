// multiproc/multiproc.hpp — everything multiproc offers, in one include.
#pragma once

#include "multiproc/codec.hpp"
#include "multiproc/context.hpp"
#include "multiproc/cpu.hpp"
#include "multiproc/error.hpp"
#include "multiproc/exit_status.hpp"
#include "multiproc/pipe.hpp"
#include "multiproc/pool.hpp"
#include "multiproc/process.hpp"
#include "multiproc/queue.hpp"
#include "multiproc/shared_memory.hpp"
#include "multiproc/start_method.hpp"
#include "multiproc/sync.hpp"
#include "multiproc/value.hpp"
