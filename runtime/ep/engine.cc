// The Maia device-partition engine: parse Maia programs (MAIAPRG1, MAIACTX1 side files), decode the device's
// weight formats bit-exactly like maia_onnx.formats, and run the partition's graph in an inner ORT CPU session.
// The rules mirror maia_onnx.runtime.emulator.EmulatedPartition step by step, so outputs are bit-identical to the
// Python shim: FP8 weights feeding DequantizeLinear are dequantized once at load (float(q) * scale in float32) and
// fed as inputs (never initializers, so kernels take the same non-constant path); E8M0 scales decode to
// 2^(e-127); other weights are initializers over the program bytes; the session runs with optimizations off.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "maia_ep.h"
#include "proto.h"

namespace maia {

namespace {

constexpr size_t kAlign = 64;
constexpr size_t kInlineBytes = 4096;  // emulator.INLINE_BYTES: smaller tensors go inline into the graph

const std::vector<std::pair<std::string, int32_t>>& type_names() {
  static const std::vector<std::pair<std::string, int32_t>> names = {
      {"FLOAT", 1},       {"UINT8", 2},          {"INT8", 3},          {"UINT16", 4},         {"INT16", 5},
      {"INT32", 6},       {"INT64", 7},          {"STRING", 8},        {"BOOL", 9},           {"FLOAT16", 10},
      {"DOUBLE", 11},     {"UINT32", 12},        {"UINT64", 13},       {"COMPLEX64", 14},     {"COMPLEX128", 15},
      {"BFLOAT16", 16},   {"FLOAT8E4M3FN", 17},  {"FLOAT8E4M3FNUZ", 18}, {"FLOAT8E5M2", 19}, {"FLOAT8E5M2FNUZ", 20},
      {"UINT4", 21},      {"INT4", 22},          {"FLOAT4E2M1", 23},   {"FLOAT8E8M0", 24}};
  return names;
}

bool packed_4bit(int32_t t) { return t == 21 || t == 22 || t == 23; }
bool is_fp8(int32_t t) { return t == 17 || t == 19; }

size_t align_up(size_t n) { return n + ((kAlign - n % kAlign) % kAlign); }

// FP8 -> float32, exact (every FP8 value is a float32). e4m3fn: 0x7F/0xFF NaN, no infinities; e5m2: IEEE-like.
float fp8_to_float(uint8_t code, bool e5m2) {
  const int mbits = e5m2 ? 2 : 3;
  const int bias = e5m2 ? 15 : 7;
  const bool negative = code & 0x80;
  const int exponent = (code >> mbits) & (e5m2 ? 0x1F : 0x0F);
  const int mantissa = code & ((1 << mbits) - 1);
  float v;
  if (!e5m2 && exponent == 0x0F && mantissa == 0x07) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (e5m2 && exponent == 0x1F) {
    v = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (exponent == 0) {
    v = std::ldexp(static_cast<float>(mantissa), 1 - bias - mbits);
  } else {
    v = std::ldexp(static_cast<float>((1 << mbits) | mantissa), exponent - bias - mbits);
  }
  return negative ? -v : v;
}

// maia_onnx.formats.mx.e8m0_to_float: 2^(e-127), 255 -> NaN (2^-127 is a float32 subnormal, still exact).
float e8m0_to_float(uint8_t e) {
  if (e == 255) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(e) - 127);
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// maia_onnx.formats.fp8.dequantize_fp8: decode then multiply by the (per-tensor, per-axis or blocked) scale.
std::vector<uint8_t> dequantize_fp8(const Weight& x, const float* scale, const std::vector<int64_t>& scale_shape,
                                    int64_t axis, int64_t block) {
  const bool e5m2 = x.dtype == 19;
  float table[256];
  for (int i = 0; i < 256; ++i) table[i] = fp8_to_float(static_cast<uint8_t>(i), e5m2);
  const int64_t n = numel(x.shape);
  std::vector<uint8_t> out(static_cast<size_t>(n) * sizeof(float));
  float* dst = reinterpret_cast<float*>(out.data());
  const int64_t scale_count = numel(scale_shape);
  const int64_t ndim = static_cast<int64_t>(x.shape.size());
  if (scale_count == 1 && block == 0) {
    for (int64_t i = 0; i < n; ++i) dst[i] = table[x.data[i]] * scale[0];
    return out;
  }
  if (axis < 0) axis += ndim;
  if (axis < 0 || axis >= ndim) throw Error("DequantizeLinear axis out of range for weight " + x.name);
  int64_t pre = 1, post = 1;
  for (int64_t d = 0; d < axis; ++d) pre *= x.shape[d];
  for (int64_t d = axis + 1; d < ndim; ++d) post *= x.shape[d];
  const int64_t len = x.shape[axis];
  if (block > 0) {
    const int64_t blocks = (len + block - 1) / block;
    std::vector<int64_t> expected = x.shape;
    expected[axis] = blocks;
    if (scale_shape != expected) throw Error("blocked scale shape does not match weight " + x.name);
    for (int64_t p = 0; p < pre; ++p)
      for (int64_t a = 0; a < len; ++a) {
        const float* s = scale + (p * blocks + a / block) * post;
        const int64_t base = (p * len + a) * post;
        for (int64_t r = 0; r < post; ++r) dst[base + r] = table[x.data[base + r]] * s[r];
      }
    return out;
  }
  if (scale_shape.size() != 1 || scale_shape[0] != len) throw Error("per-axis scale shape does not match weight " + x.name);
  for (int64_t p = 0; p < pre; ++p)
    for (int64_t a = 0; a < len; ++a) {
      const float s = scale[a];
      const int64_t base = (p * len + a) * post;
      for (int64_t r = 0; r < post; ++r) dst[base + r] = table[x.data[base + r]] * s;
    }
  return out;
}

struct ParsedNode {
  std::string name, op_type, domain;
  std::vector<std::string> inputs, outputs;
  std::map<std::string, int64_t> ints;
};

ParsedNode parse_node(const pb::Field& field) {
  ParsedNode node;
  pb::Reader reader(field);
  pb::Field f;
  while (reader.next(f)) {
    switch (f.number) {
      case 1: node.inputs.push_back(f.str()); break;
      case 2: node.outputs.push_back(f.str()); break;
      case 3: node.name = f.str(); break;
      case 4: node.op_type = f.str(); break;
      case 7: node.domain = f.str(); break;
      case 5: {
        pb::Reader attr(f);
        pb::Field a;
        std::string name;
        int64_t i = 0;
        bool has_i = false;
        while (attr.next(a)) {
          if (a.number == 1) name = a.str();
          if (a.number == 3) {
            i = static_cast<int64_t>(a.varint);
            has_i = true;
          }
        }
        if (has_i) node.ints[name] = i;
        break;
      }
      default: break;
    }
  }
  return node;
}

std::string tensor_proto(const std::string& name, int32_t dtype, const std::vector<int64_t>& dims, const uint8_t* raw,
                         size_t nbytes, bool external) {
  pb::Writer w;
  for (int64_t d : dims) w.int_field(1, d);
  w.int_field(2, dtype);
  w.bytes_field(8, name);
  if (!external) {
    w.bytes_field(9, raw, nbytes);
    return w.out;
  }
  const std::pair<const char*, std::string> entries[] = {
      {"location", "__maia_program__"}, {"offset", "0"}, {"length", std::to_string(nbytes)}};
  for (const auto& e : entries) {
    pb::Writer kv;
    kv.bytes_field(1, std::string(e.first));
    kv.bytes_field(2, e.second);
    w.bytes_field(13, kv.out);
  }
  w.int_field(14, 1);  // data_location = EXTERNAL
  return w.out;
}

std::string float_input(const std::string& name, const std::vector<int64_t>& dims) {
  pb::Writer shape;
  for (int64_t d : dims) {
    pb::Writer dim;
    dim.int_field(1, d);
    shape.bytes_field(1, dim.out);
  }
  pb::Writer tensor;
  tensor.int_field(1, 1);
  tensor.bytes_field(2, shape.out);
  pb::Writer type;
  type.bytes_field(1, tensor.out);
  pb::Writer value;
  value.bytes_field(1, name);
  value.bytes_field(2, type.out);
  return value.out;
}


std::string int_attribute(const std::string& name, int64_t value) {
  pb::Writer a;
  a.bytes_field(1, name);
  a.int_field(3, value);
  a.int_field(20, 2);  // AttributeProto.INT
  return a.out;
}

bool is_onnx(const ParsedNode& node) { return node.domain.empty() || node.domain == "ai.onnx"; }

int64_t int_or(const ParsedNode& node, const char* name, int64_t fallback) {
  auto it = node.ints.find(name);
  return it == node.ints.end() ? fallback : it->second;
}

bool all_zero(const Weight& w) { return std::all_of(w.data, w.data + w.nbytes, [](uint8_t b) { return b == 0; }); }

struct NodeRef {
  size_t field;  // index among the graph's fields
  ParsedNode node;
};

// The graph's node section with each activation QuantizeLinear -> DequantizeLinear pair (float8, saturating, the
// same constant FLOAT scale, zero or no zero point, not blocked) replaced by one FakeQuantFp8 node. A quantize
// whose FP8 value is used anywhere else (another node, a partition output) stays: no quantization point is lost.
std::string fused_nodes(const std::vector<pb::Field>& fields, const std::vector<NodeRef>& nodes,
                        const std::map<std::string, Weight>& weights, const std::set<std::string>& outputs,
                        size_t& fused) {
  auto weight = [&](const std::string& name) -> const Weight* {
    auto it = weights.find(name);
    return it == weights.end() ? nullptr : &it->second;
  };
  std::map<std::string, size_t> quantize_of;  // FP8 value -> index in nodes of its fusable QuantizeLinear
  std::map<std::string, int64_t> fp8_type;
  std::map<std::string, size_t> uses;
  for (size_t i = 0; i < nodes.size(); ++i) {
    const ParsedNode& n = nodes[i].node;
    for (const std::string& in : n.inputs) uses[in]++;
    if (n.op_type != "QuantizeLinear" || !is_onnx(n) || n.inputs.size() < 2 || n.outputs.size() != 1) continue;
    if (int_or(n, "block_size", 0) != 0 || int_or(n, "saturate", 1) != 1) continue;
    const Weight* scale = weight(n.inputs[1]);
    if (scale == nullptr || scale->dtype != 1) continue;
    int64_t to = int_or(n, "output_dtype", 0);
    if (n.inputs.size() > 2 && !n.inputs[2].empty()) {
      const Weight* zero = weight(n.inputs[2]);
      if (zero == nullptr || !all_zero(*zero)) continue;
      to = zero->dtype;
    }
    if (!is_fp8(static_cast<int32_t>(to))) continue;
    quantize_of[n.outputs[0]] = i;
    fp8_type[n.outputs[0]] = to;
  }
  std::map<size_t, std::string> replaced;  // node index -> fused NodeProto
  std::map<size_t, size_t> fused_uses;     // quantize node index -> consumers replaced
  for (size_t i = 0; i < nodes.size(); ++i) {
    const ParsedNode& d = nodes[i].node;
    if (d.op_type != "DequantizeLinear" || !is_onnx(d) || d.inputs.size() < 2 || d.outputs.size() != 1) continue;
    auto q_it = quantize_of.find(d.inputs[0]);
    if (q_it == quantize_of.end()) continue;
    const ParsedNode& q = nodes[q_it->second].node;
    if (d.inputs[1] != q.inputs[1] || int_or(d, "block_size", 0) != 0) continue;
    const int64_t out_dtype = int_or(d, "output_dtype", 0);
    if (out_dtype != 0 && out_dtype != 1) continue;
    if (d.inputs.size() > 2 && !d.inputs[2].empty()) {
      const Weight* zero = weight(d.inputs[2]);
      if (zero == nullptr || !all_zero(*zero) || zero->dtype != fp8_type[d.inputs[0]]) continue;
    }
    const Weight* scale = weight(q.inputs[1]);
    const int64_t axis = int_or(q, "axis", 1);
    if (numel(scale->shape) != 1 && int_or(d, "axis", 1) != axis) continue;
    pb::Writer w;
    w.bytes_field(1, q.inputs[0]);
    w.bytes_field(1, q.inputs[1]);
    w.bytes_field(2, d.outputs[0]);
    w.bytes_field(3, d.name.empty() ? d.outputs[0] + "_fake_quant" : d.name);
    w.bytes_field(4, std::string(kFakeQuantOp));
    w.bytes_field(5, int_attribute("axis", axis));
    w.bytes_field(5, int_attribute("to", fp8_type[d.inputs[0]]));
    w.bytes_field(7, std::string(kFakeQuantDomain));
    replaced[i] = w.out;
    fused_uses[q_it->second]++;
  }
  fused = replaced.size();
  pb::Writer out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    auto r = replaced.find(i);
    if (r != replaced.end()) {
      out.bytes_field(1, r->second);
      continue;
    }
    auto f = fused_uses.find(i);
    const std::string& value = nodes[i].node.outputs.empty() ? std::string() : nodes[i].node.outputs[0];
    if (f != fused_uses.end() && f->second == uses[value] && !outputs.count(value)) continue;  // every use fused
    out.raw(fields[nodes[i].field]);
  }
  return out.out;
}

}  // namespace

int32_t element_type(const std::string& name) {
  for (const auto& [n, t] : type_names())
    if (n == name) return t;
  throw Error("unknown ONNX element type " + name);
}

std::string element_type_name(int32_t type) {
  for (const auto& [n, t] : type_names())
    if (t == type) return n;
  return "UNDEFINED";
}

size_t element_bytes(int32_t type, size_t count) {
  switch (type) {
    case 1: case 6: case 12: return 4 * count;
    case 2: case 3: case 9: case 17: case 18: case 19: case 20: case 24: return count;
    case 4: case 5: case 10: case 16: return 2 * count;
    case 7: case 11: case 13: case 14: return 8 * count;
    case 15: return 16 * count;
    case 21: case 22: case 23: return (count + 1) / 2;
    default: throw Error("unsupported element type " + std::to_string(type));
  }
}

Engine::Engine(const std::string& model_bytes, std::vector<Weight> weights, std::vector<std::string> input_names,
               std::vector<std::string> output_names, std::shared_ptr<void> storage)
    : input_names_(std::move(input_names)), output_names_(std::move(output_names)), storage_(std::move(storage)) {
  check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_));
  std::map<std::string, Weight> specs;  // program weights as stored
  std::map<std::string, Weight> arrays;  // what the session sees (E8M0 decoded, folded FP8 added)
  for (Weight& w : weights) {
    specs[w.name] = w;
    Weight a = w;
    if (w.e8m0) {
      owned_.emplace_back(static_cast<size_t>(numel(w.shape)) * sizeof(float));
      float* dst = reinterpret_cast<float*>(owned_.back().data());
      for (int64_t i = 0; i < numel(w.shape); ++i) dst[i] = e8m0_to_float(w.data[i]);
      a.data = owned_.back().data();
      a.nbytes = owned_.back().size();
      a.dtype = 1;
      a.e8m0 = false;
    }
    arrays[w.name] = a;
  }

  // Locate the graph and its nodes.
  pb::Reader model(model_bytes.data(), model_bytes.size());
  pb::Field f, graph_field;
  bool has_graph = false;
  while (model.next(f))
    if (f.number == 7) {
      graph_field = f;
      has_graph = true;
    }
  if (!has_graph) throw Error("Maia program has no graph: recompile the model");
  std::vector<pb::Field> graph_fields;
  {
    pb::Reader graph(graph_field);
    while (graph.next(f)) graph_fields.push_back(f);
  }

  // Fold DequantizeLinear(FP8 weight, FLOAT scale[, zero zero-point]) into an FP32 weight (emulator rules).
  std::set<std::string> folded;
  std::vector<NodeRef> kept_nodes;
  for (size_t i = 0; i < graph_fields.size(); ++i) {
    if (graph_fields[i].number != 1) continue;
    ParsedNode node = parse_node(graph_fields[i]);
    if (node.op_type == "DequantizeLinear" && (node.domain.empty() || node.domain == "ai.onnx") &&
        node.inputs.size() >= 2) {
      const std::string& x = node.inputs[0];
      const std::string& scale = node.inputs[1];
      const std::string zero = node.inputs.size() > 2 ? node.inputs[2] : "";
      const int64_t block = node.ints.count("block_size") ? node.ints["block_size"] : 0;
      const int64_t out_dtype = node.ints.count("output_dtype") ? node.ints["output_dtype"] : 0;
      bool zero_ok = zero.empty();
      if (!zero.empty() && specs.count(zero)) {
        const Weight& z = arrays[zero];
        zero_ok = std::all_of(z.data, z.data + z.nbytes, [](uint8_t b) { return b == 0; });
      }
      if (specs.count(x) && is_fp8(specs[x].dtype) && specs.count(scale) && (out_dtype == 0 || out_dtype == 1) &&
          specs[scale].dtype == 1 && zero_ok) {
        const int64_t axis = node.ints.count("axis") ? node.ints["axis"] : 1;
        const Weight& s = arrays[scale];
        owned_.push_back(dequantize_fp8(specs[x], reinterpret_cast<const float*>(s.data), s.shape, axis, block));
        Weight out;
        out.name = node.outputs.at(0);
        out.dtype = 1;
        out.shape = specs[x].shape;
        out.data = owned_.back().data();
        out.nbytes = owned_.back().size();
        arrays[out.name] = out;
        folded.insert(out.name);
        continue;
      }
    }
    kept_nodes.push_back({i, std::move(node)});
  }
  std::set<std::string> used(output_names_.begin(), output_names_.end());
  for (const NodeRef& ref : kept_nodes) used.insert(ref.node.inputs.begin(), ref.node.inputs.end());

  // Rewrite the graph: kept nodes (unfused, and with FP8 fake-quant pairs fused), folded weights as extra inputs,
  // weights as (inline or external) initializers.
  pb::Writer plain_nodes;
  for (const NodeRef& ref : kept_nodes) plain_nodes.raw(graph_fields[ref.field]);
  size_t fused = 0;
  const std::string fused_node_bytes =
      fused_nodes(graph_fields, kept_nodes, arrays, std::set<std::string>(output_names_.begin(), output_names_.end()),
                  fused);
  pb::Writer graph;
  for (size_t i = 0; i < graph_fields.size(); ++i)
    if (graph_fields[i].number != 1) graph.raw(graph_fields[i]);
  feed_names_ = input_names_;
  for (const std::string& name : folded) {  // std::set: sorted like the emulator's sorted(folded)
    if (!used.count(name)) continue;
    const Weight& w = arrays[name];
    graph.bytes_field(11, float_input(name, w.shape));
    OrtValue* value = nullptr;
    check(ort->CreateTensorWithDataAsOrtValue(cpu_, const_cast<uint8_t*>(w.data), w.nbytes, w.shape.data(),
                                              w.shape.size(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &value));
    weight_feeds_.push_back(value);
    feed_names_.push_back(name);
  }
  std::vector<std::string> external_names;
  for (const auto& [name, w] : arrays) {  // std::map: sorted like the emulator's sorted(arrays)
    if (!used.count(name) || folded.count(name)) continue;
    const std::vector<int64_t>& dims = specs.count(name) ? specs[name].shape : w.shape;
    if (packed_4bit(w.dtype) || w.nbytes < kInlineBytes) {
      graph.bytes_field(5, tensor_proto(name, w.dtype, dims, w.data, w.nbytes, false));
      continue;
    }
    graph.bytes_field(5, tensor_proto(name, w.dtype, dims, nullptr, w.nbytes, true));
    OrtValue* value = nullptr;
    check(ort->CreateTensorWithDataAsOrtValue(cpu_, const_cast<uint8_t*>(w.data), w.nbytes, w.shape.data(),
                                              w.shape.size(), static_cast<ONNXTensorElementDataType>(w.dtype),
                                              &value));
    initializers_.push_back(value);
    external_names.push_back(name);
  }
  auto model_with = [&](const std::string& nodes, bool custom_domain) {
    pb::Writer out_model;
    pb::Reader again(model_bytes.data(), model_bytes.size());
    while (again.next(f)) {
      if (f.number == 7) out_model.bytes_field(7, nodes + graph.out);
      else out_model.raw(f);
    }
    if (custom_domain) {
      pb::Writer opset;
      opset.bytes_field(1, std::string(kFakeQuantDomain));
      opset.int_field(2, 1);
      out_model.bytes_field(8, opset.out);
    }
    return out_model.out;
  };

  check(ort->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "maia-ep", &env_));  // ORT's one process-wide environment
  auto create = [&](const std::string& model, bool custom_domain) {
    OrtSessionOptions* options = nullptr;
    check(ort->CreateSessionOptions(&options));
    std::unique_ptr<OrtSessionOptions, void (*)(OrtSessionOptions*)> hold(options, ort->ReleaseSessionOptions);
    check(ort->SetSessionGraphOptimizationLevel(options, ORT_DISABLE_ALL));
    check(ort->SetSessionLogSeverityLevel(options, 3));
    if (custom_domain) check(ort->AddCustomOpDomain(options, fake_quant_domain()));
    if (!external_names.empty()) {
      std::vector<const char*> names;
      for (const auto& n : external_names) names.push_back(n.c_str());
      check(ort->AddExternalInitializers(options, names.data(), initializers_.data(), names.size()));
    }
    check(ort->CreateSessionFromArray(env_, model.data(), model.size(), options, &session_));
  };
  if (fused > 0) {
    try {
      create(model_with(fused_node_bytes, true), true);
      fused_pairs_ = fused;
      return;
    } catch (const Error&) {
      session_ = nullptr;  // e.g. a pair over a non-float32 activation: run the pairs unfused, as ORT would
    }
  }
  create(model_with(plain_nodes.out, false), false);
}

Engine::~Engine() {
  if (session_) ort->ReleaseSession(session_);
  for (OrtValue* v : weight_feeds_) ort->ReleaseValue(v);
  for (OrtValue* v : initializers_) ort->ReleaseValue(v);
  if (cpu_) ort->ReleaseMemoryInfo(cpu_);
  if (env_) ort->ReleaseEnv(env_);
}

void Engine::run(OrtKernelContext* context, const std::vector<const OrtValue*>& inputs,
                 const std::vector<size_t>& out_slots) {
  std::vector<const OrtValue*> feeds(inputs);
  feeds.insert(feeds.end(), weight_feeds_.begin(), weight_feeds_.end());
  std::vector<const char*> in_names, out_names;
  for (const auto& n : feed_names_) in_names.push_back(n.c_str());
  for (const auto& n : output_names_) out_names.push_back(n.c_str());
  std::vector<OrtValue*> results(output_names_.size(), nullptr);
  struct Release {
    std::vector<OrtValue*>& values;
    ~Release() {
      for (OrtValue* v : values)
        if (v) ort->ReleaseValue(v);
    }
  } release{results};
  check(ort->Run(session_, nullptr, in_names.data(), feeds.data(), feeds.size(), out_names.data(), out_names.size(),
                 results.data()));
  for (size_t j = 0; j < results.size(); ++j) {
    const TensorLayout t = describe_tensor(results[j], "outputs of a Maia partition");
    OrtValue* out = nullptr;
    check(ort->KernelContext_GetOutput(context, out_slots[j], t.dims.data(), t.dims.size(), &out));
    void* dst = nullptr;
    const void* src = nullptr;
    check(ort->GetTensorMutableData(out, &dst));
    check(ort->GetTensorData(results[j], &src));
    if (t.bytes) std::memcpy(dst, src, t.bytes);
  }
}

Program parse_program(const uint8_t* data, size_t size, std::shared_ptr<void> storage) {
  if (size < 16 || std::memcmp(data, "MAIAPRG1", 8) != 0)
    throw Error("EPContext blob is not a Maia program (MAIAPRG1): recompile with maia-onnx compile", ORT_INVALID_GRAPH);
  uint64_t length = 0;
  std::memcpy(&length, data + 8, 8);
  if (16 + length > size) throw Error("Maia program header is truncated: recompile the model", ORT_INVALID_GRAPH);
  Program program;
  program.header = Json::parse(reinterpret_cast<const char*>(data + 16), static_cast<size_t>(length));
  if (program.header["format_version"].as_int() != 1)
    throw Error("Maia program format unsupported by this EP: upgrade maia-onnx", ORT_INVALID_GRAPH);
  program.base = data + align_up(16 + static_cast<size_t>(length));
  program.storage = std::move(storage);
  const Json& graph = program.header["graph"];
  if (program.base + graph["offset"].as_int() + graph["length"].as_int() > data + size)
    throw Error("Maia program is truncated: recompile the model", ORT_INVALID_GRAPH);
  for (const Json& spec : program.header["weights"].arr)
    if (program.base + spec["offset"].as_int() + spec["length"].as_int() > data + size)
      throw Error("Maia program weight " + spec["name"].str + " lies outside the program: recompile the model",
                  ORT_INVALID_GRAPH);
  return program;
}

std::unique_ptr<Engine> engine_from_program(const Program& program) {
  const Json& h = program.header;
  std::string graph(reinterpret_cast<const char*>(program.base + h["graph"]["offset"].as_int()),
                    static_cast<size_t>(h["graph"]["length"].as_int()));
  std::vector<Weight> weights;
  for (const Json& spec : h["weights"].arr) {
    Weight w;
    w.name = spec["name"].as_str();
    w.dtype = element_type(spec["dtype"].as_str());
    for (const Json& d : spec["shape"].arr) w.shape.push_back(d.as_int());
    w.data = program.base + spec["offset"].as_int();
    w.nbytes = static_cast<size_t>(spec["length"].as_int());
    w.e8m0 = spec["format"].str == "e8m0";
    weights.push_back(std::move(w));
  }
  std::vector<std::string> inputs, outputs;
  for (const Json& v : h["inputs"].arr) inputs.push_back(v["name"].as_str());
  for (const Json& v : h["outputs"].arr) outputs.push_back(v["name"].as_str());
  return std::make_unique<Engine>(graph, std::move(weights), std::move(inputs), std::move(outputs), program.storage);
}

struct SideFiles::Mapped {
  const uint8_t* data = nullptr;
  size_t size = 0;
  Json index;
  ~Mapped() {
    if (data) munmap(const_cast<uint8_t*>(data), size);
  }
};

Program SideFiles::program(const std::string& path, const std::string& partition) {
  auto it = files_.find(path);
  if (it == files_.end()) {
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error("Maia context side file " + path + " not found: copy it beside the model", ORT_NO_SUCHFILE);
    struct stat st {};
    fstat(fd, &st);
    auto mapped = std::make_shared<Mapped>();
    mapped->size = static_cast<size_t>(st.st_size);
    void* p = mapped->size ? mmap(nullptr, mapped->size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (p == MAP_FAILED) throw Error("cannot map Maia context side file " + path);
    mapped->data = static_cast<const uint8_t*>(p);
    const uint8_t* d = mapped->data;
    const size_t n = mapped->size;
    if (n < 2 * kAlign || std::memcmp(d, "MAIACTX1", 8) != 0 || std::memcmp(d + n - 8, "MAIACTX1", 8) != 0)
      throw Error("Maia context side file " + path + " is not a complete MAIACTX1 container (truncated?): recompile",
                  ORT_INVALID_GRAPH);
    uint64_t length = 0;
    std::memcpy(&length, d + n - 16, 8);
    if (length + 16 > n) throw Error("Maia context side file " + path + " has a bad index: recompile", ORT_INVALID_GRAPH);
    mapped->index = Json::parse(reinterpret_cast<const char*>(d + n - 16 - length), static_cast<size_t>(length));
    it = files_.emplace(path, mapped).first;
  }
  const std::shared_ptr<Mapped>& m = it->second;
  const Json& entry = m->index[partition];
  if (entry.kind != Json::Array || entry.size() != 2)
    throw Error("partition " + partition + " missing from side file " + path + ": recompile the model", ORT_INVALID_GRAPH);
  const size_t offset = static_cast<size_t>(entry[0].as_int());
  const size_t length = static_cast<size_t>(entry[1].as_int());
  if (offset + length > m->size) throw Error("side file " + path + " is truncated: recompile the model", ORT_INVALID_GRAPH);
  return parse_program(m->data + offset, length, m);
}

}  // namespace maia
