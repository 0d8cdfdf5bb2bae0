// Build configuration shared by every public header: the export macro and version.
#pragma once

#define DRUN_VERSION_MAJOR 0
#define DRUN_VERSION_MINOR 1
#define DRUN_VERSION_PATCH 0

// The library is built with hidden visibility; only what carries DRUN_API is exported.
#if defined(__GNUC__)
#define DRUN_API __attribute__((visibility("default")))
#else
#define DRUN_API
#endif
