// Fused FP8 fake-quantization: one pass for an activation QuantizeLinear -> DequantizeLinear pair.
//
// y = float(fp8(x / scale)) * scale, bit for bit what ONNX Runtime's QuantizeLinear (float8, saturate=1) followed
// by DequantizeLinear computes: x / scale in float32; round to nearest even onto the FP8 grid, magnitudes above
// the format's largest finite value (and infinities) saturated to it, the sign kept (also on zero), float32
// subnormals to zero, NaN to the canonical quiet NaN of its sign; then the exact FP8 value times the scale.
// Rounding uses the FPU: with |v| clamped and E = max(exponent(|v|), emin), the float32 sum 2^(E+23-m) + |v| is
// |v| rounded to the FP8 grid of its binade (m mantissa bits; subnormals included), and subtracting 2^(E+23-m)
// again is exact. No branches per element, so the loop vectorizes.
//
// Registered as com.maia.emulator::FakeQuantFp8(x: float, scale: float) -> float, attributes ``axis`` (per-axis
// scales; a one-element scale is per-tensor) and ``to`` (17 = FLOAT8E4M3FN, 19 = FLOAT8E5M2), in the inner
// sessions of engines whose partitions have such pairs (engine.cc fuses them).
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>

#include "maia_ep.h"

namespace maia {

namespace {

constexpr size_t kParallelChunk = 1 << 15;  // elements per task when ORT's thread pool splits a large tensor

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

struct Format {
  uint32_t max_bits;    // the largest finite value's float32 bits (448 or 57344)
  uint32_t emin;        // biased float32 exponent of the smallest normal (2^-6 or 2^-14)
  uint32_t shift;       // 23 - mantissa bits: the FP8 step in float32 ulps of the binade's first value
};

constexpr Format kE4M3{0x43E00000u, 127 - 6, 23 - 3};
constexpr Format kE5M2{0x47600000u, 127 - 14, 23 - 2};

void fake_quant_span(const float* x, float* y, size_t n, float scale, const Format f) {
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i] / scale;
    const uint32_t b = bits_of(v);
    const uint32_t sign = b & 0x80000000u;
    const uint32_t a = b & 0x7FFFFFFFu;
    const uint32_t c = a < f.max_bits ? a : f.max_bits;  // saturate (infinities too); NaN handled below
    uint32_t e = c >> 23;
    e = e < f.emin ? f.emin : e;
    const float big = float_of((e + f.shift) << 23);
    const float r = (big + float_of(c)) - big;  // round to nearest even on the FP8 grid, exact difference
    uint32_t out = bits_of(r) | sign;
    out = a > 0x7F800000u ? (sign | 0x7FC00000u) : out;
    y[i] = float_of(out) * scale;
  }
}

struct Job {
  const float* x;
  float* y;
  const float* scale;
  size_t n, outer, channels, inner;  // per-axis layout [outer, channels, inner]; per-tensor: channels == 1
  Format format;
};

void run_chunk(void* data, size_t chunk) {
  const Job& job = *static_cast<const Job*>(data);
  if (job.channels == 1) {
    const size_t begin = chunk * kParallelChunk;
    const size_t end = std::min(job.n, begin + kParallelChunk);
    fake_quant_span(job.x + begin, job.y + begin, end - begin, job.scale[0], job.format);
    return;
  }
  const size_t row = chunk;  // one (outer, channel) row per task
  const size_t offset = row * job.inner;
  fake_quant_span(job.x + offset, job.y + offset, job.inner, job.scale[row % job.channels], job.format);
}

struct FakeQuantKernel {
  int64_t axis = 1;
  Format format = kE4M3;
};

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                                      void** kernel) noexcept {
  auto* k = new FakeQuantKernel();
  int64_t to = 17;
  OrtStatus* s = api->KernelInfoGetAttribute_int64(info, "to", &to);
  if (s) api->ReleaseStatus(s);
  s = api->KernelInfoGetAttribute_int64(info, "axis", &k->axis);
  if (s) api->ReleaseStatus(s);
  k->format = to == 19 ? kE5M2 : kE4M3;
  *kernel = k;
  return nullptr;
}

std::vector<int64_t> tensor_shape(const OrtValue* value, size_t& count) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(ort->GetTensorTypeAndShape(value, &info));
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> hold(
      info, ort->ReleaseTensorTypeAndShapeInfo);
  size_t rank = 0;
  check(ort->GetDimensionsCount(info, &rank));
  std::vector<int64_t> dims(rank);
  check(ort->GetDimensions(info, dims.data(), rank));
  check(ort->GetTensorShapeElementCount(info, &count));
  return dims;
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) noexcept {
  try {
    const auto& k = *static_cast<FakeQuantKernel*>(kernel);
    const OrtValue* x = nullptr;
    const OrtValue* scale = nullptr;
    check(ort->KernelContext_GetInput(context, 0, &x));
    check(ort->KernelContext_GetInput(context, 1, &scale));
    size_t n = 0, scales = 0;
    std::vector<int64_t> dims = tensor_shape(x, n);
    tensor_shape(scale, scales);
    OrtValue* y = nullptr;
    check(ort->KernelContext_GetOutput(context, 0, dims.data(), dims.size(), &y));
    Job job{};
    check(ort->GetTensorData(x, reinterpret_cast<const void**>(&job.x)));
    check(ort->GetTensorMutableData(y, reinterpret_cast<void**>(&job.y)));
    check(ort->GetTensorData(scale, reinterpret_cast<const void**>(&job.scale)));
    job.n = n;
    job.format = k.format;
    job.channels = 1;
    size_t tasks = (n + kParallelChunk - 1) / kParallelChunk;
    if (scales != 1) {  // per-axis: QuantizeLinear's [outer, axis, inner] broadcast
      int64_t axis = k.axis < 0 ? k.axis + static_cast<int64_t>(dims.size()) : k.axis;
      if (axis < 0 || axis >= static_cast<int64_t>(dims.size()) || static_cast<size_t>(dims[axis]) != scales)
        throw Error("FakeQuantFp8: scale does not match the input's axis");
      job.outer = 1;
      job.inner = 1;
      for (int64_t d = 0; d < axis; ++d) job.outer *= static_cast<size_t>(dims[d]);
      for (size_t d = static_cast<size_t>(axis) + 1; d < dims.size(); ++d) job.inner *= static_cast<size_t>(dims[d]);
      job.channels = scales;
      tasks = job.outer * job.channels;
    }
    if (n == 0) return nullptr;
    if (tasks > 1 && n >= 2 * kParallelChunk) {
      check(ort->KernelContext_ParallelFor(context, run_chunk, tasks, 0, &job));
    } else {
      for (size_t t = 0; t < tasks; ++t) run_chunk(&job, t);
    }
    return nullptr;
  } catch (const std::exception& e) {
    return ort->CreateStatus(ORT_EP_FAIL, e.what());
  }
}

struct FakeQuantOp : OrtCustomOp {
  FakeQuantOp() : OrtCustomOp{} {
    version = kOrtApiVersion;
    CreateKernel = nullptr;
    GetName = [](const OrtCustomOp*) noexcept -> const char* { return kFakeQuantOp; };
    GetExecutionProviderType = [](const OrtCustomOp*) noexcept -> const char* { return "CPUExecutionProvider"; };
    GetInputType = [](const OrtCustomOp*, size_t) noexcept { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return 2; };
    GetOutputType = [](const OrtCustomOp*, size_t) noexcept { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetOutputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return 1; };
    KernelCompute = nullptr;
    KernelDestroy = [](void* kernel) noexcept { delete static_cast<FakeQuantKernel*>(kernel); };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) noexcept { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) noexcept { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
    CreateKernelV2 = create_kernel;
    KernelComputeV2 = compute;
    InferOutputShapeFn = nullptr;
    GetStartVersion = [](const OrtCustomOp*) noexcept { return 1; };
    GetEndVersion = [](const OrtCustomOp*) noexcept { return std::numeric_limits<int>::max(); };
    GetMayInplace = [](int** in, int** out) noexcept -> size_t {
      *in = nullptr;
      *out = nullptr;
      return 0;
    };
    ReleaseMayInplace = [](int*, int*) noexcept {};
    GetAliasMap = [](int** in, int** out) noexcept -> size_t {
      *in = nullptr;
      *out = nullptr;
      return 0;
    };
    ReleaseAliasMap = [](int*, int*) noexcept {};
  }
};

}  // namespace

void fake_quant_fp8(const float* x, float* y, size_t n, float scale, bool e5m2) {
  fake_quant_span(x, y, n, scale, e5m2 ? kE5M2 : kE4M3);
}

OrtCustomOpDomain* fake_quant_domain() {
  // one process-wide domain: session options keep a pointer to it for every session created from them
  static FakeQuantOp op;
  static OrtCustomOpDomain* domain = [] {
    OrtCustomOpDomain* d = nullptr;
    check(ort->CreateCustomOpDomain(kFakeQuantDomain, &d));
    check(ort->CustomOpDomain_Add(d, &op));
    return d;
  }();
  return domain;
}

}  // namespace maia
