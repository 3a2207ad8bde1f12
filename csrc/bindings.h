// Shared by the two files of the pybind11 module cllm._core (bindings.cpp, bindings_kernels.cpp): array types
// and the argument checks done at the boundary, where bad input becomes a ValueError.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

namespace cllm_py {

namespace py = pybind11;

using IntArray = py::array_t<int32_t, py::array::c_style>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

inline void require(bool ok, const std::string& msg) {
    if (!ok) throw py::value_error(msg);
}

// Runs f without the GIL: for everything that does real work, so other Python threads run meanwhile.
template <class F>
void nogil(F&& f) {
    py::gil_scoped_release release;
    std::forward<F>(f)();
}

inline FloatArray empty(std::vector<py::ssize_t> shape) { return FloatArray(shape); }
FloatArray zeros(std::vector<py::ssize_t> shape);

// [batch, time] token ids: not empty, T <= max_seq_len, every id in [0, vocab_size).
void check_tokens(const IntArray& a, const char* what, int vocab_size, int max_seq_len);
// Every id of a (any shape) in [0, vocab_size); the first one outside is named with its position.
void check_ids(const IntArray& a, const char* what, int vocab_size);

void bind_kernels(py::module_& mod);    // bindings_kernels.cpp: the submodule _core.kernels
void bind_optimizer(py::module_& mod);  // bindings_kernels.cpp: adamw_step, sgd_step, grad_norm, scale_

}  // namespace cllm_py
