/* Calls a VDDK log callback, whose type is void (const char *fmt, va_list args):
 * stable Rust cannot build a va_list, so this variadic helper does. */
#include <stdarg.h>

typedef void (LogFunc)(const char *fmt, va_list args);

static void call_with_args(LogFunc *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    f(fmt, ap);
    va_end(ap);
}

void vdisk_ffi_call_log(void *f, const char *message)
{
    if (f != 0 && message != 0) {
        call_with_args((LogFunc *)f, "%s", message);
    }
}
