// The C ABI convention of trainer/csrc: an entry point returns null on success, or the error's
// message (one line, no backtrace), valid until the calling thread's next call.
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace ddetr_c_api {

inline std::string& last_error() {
  thread_local std::string message;
  return message;
}

// Runs f, turning any exception into the returned message.
template <typename F> const char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    last_error() = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error() = e.what();
  }
  return last_error().c_str();
}

}  // namespace ddetr_c_api
