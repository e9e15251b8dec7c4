// Maia programs written by the EP itself, when ONNX Runtime compiles a model to an EPContext model
// (ModelCompiler, ep.context_enable=1): the MAIAPRG1 layout of runtime/compile.py, so a program from either
// compiler loads in the plugin EP and in the Python shim alike.
//
//   magic "MAIAPRG1" | header length (u64 LE) | header JSON (sorted keys) | pad to 64 | ONNX subgraph | weights
//
// The header lists the partition I/O, every weight (name, ONNX dtype, device format, shape, offset, length) and the
// plan (schedule, memory arena plan). What this writer leaves out (the documented subset):
// ``plan.estimate`` is empty (the roofline estimate is the Python perf model's), and weights that QuantizeMxPass
// tagged ``mx9``/``mx6`` (value metadata ORT does not expose) carry their storage format ("fp32") without the tag. (Also in runtime/ort_compile.py.)
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <tuple>

#include "maia_ep.h"

namespace maia {

namespace {

constexpr size_t kAlign = 64;

size_t pad(size_t n) { return (kAlign - n % kAlign) % kAlign; }

std::string device_format(int32_t dtype) {
  switch (dtype) {
    case 1: return "fp32";
    case 10: return "fp16";
    case 16: return "bf16";
    case 17: return "fp8-e4m3fn";
    case 19: return "fp8-e5m2";
    case 24: return "e8m0";
    case 23: return "fp4-e2m1";
    case 3: return "int8";
    case 2: return "uint8";
    case 7: return "int64";
    case 6: return "int32";
    case 9: return "bool";
    case 22: return "int4";
    case 21: return "uint4";
    default: {
      std::string name = element_type_name(dtype);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return name;
    }
  }
}

// MX shared scales: a FLOAT tensor of normal powers of two is stored as one biased-exponent byte per element.
bool e8m0_exponents(const Weight& w, std::string* out) {
  if (w.dtype != 1) return false;
  const size_t n = w.nbytes / 4;
  if (out) out->resize(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, w.data + 4 * i, 4);
    const uint32_t exponent = (b >> 23) & 0xFF;
    if ((b & 0x807FFFFFu) || exponent == 0 || exponent == 0xFF) return false;
    if (out) (*out)[i] = static_cast<char>(exponent);
  }
  return true;
}

Json value_spec(const std::string& name, const OrtValueInfo* value) {
  Json spec = Json::object();
  spec.set("name", Json::of(name));
  TypeInfo t = value ? type_of(value) : TypeInfo{};
  spec.set("dtype", t.tensor ? Json::of(element_type_name(t.elem)) : Json());
  Json shape = Json::list();
  for (size_t i = 0; i < t.dims.size(); ++i)
    shape.push(t.dims[i] >= 0 ? Json::of(static_cast<double>(t.dims[i]))
                              : (t.symbols[i].empty() ? Json() : Json::of(t.symbols[i])));
  spec.set("shape", t.tensor ? shape : Json());
  return spec;
}

std::string str_of(const OrtNode* node, OrtStatus* (*getter)(const OrtNode*, const char**)) {
  const char* s = nullptr;
  check(getter(node, &s));
  return s ? s : "";
}

// Elements of a value at ``dims`` (named symbolic dims; "*" sizes the others, else 1; unknown rank: a scalar).
int64_t numel_at(const TypeInfo& t, const std::map<std::string, int64_t>& dims) {
  int64_t n = 1;
  auto any = dims.find("*");
  for (size_t i = 0; i < t.dims.size(); ++i) {
    if (t.dims[i] >= 0) {
      n *= t.dims[i];
      continue;
    }
    auto it = dims.find(t.symbols[i]);
    n *= it != dims.end() ? it->second : (any != dims.end() ? any->second : 1);
  }
  return n;
}

// runtime/compile.py _memory_plan: first-fit arena for the partition's intermediate values by liveness.
Json memory_plan(const std::vector<const OrtNode*>& nodes, const std::set<std::string>& outputs,
                 const std::map<std::string, int64_t>& dims) {
  std::map<std::string, size_t> last_use;
  for (size_t step = 0; step < nodes.size(); ++step)
    for (const OrtValueInfo* v : node_values(nodes[step], true))
      if (v) last_use[value_name(v)] = step;
  struct Live {
    int64_t offset, size;
    size_t last;
  };
  std::vector<Live> live;
  int64_t arena = 0;
  Json buffers = Json::list();
  for (size_t step = 0; step < nodes.size(); ++step) {
    std::vector<Live> still;
    for (const Live& b : live)
      if (b.last >= step) still.push_back(b);
    live.swap(still);
    for (const OrtValueInfo* v : node_values(nodes[step], false)) {
      if (v == nullptr) continue;
      TypeInfo t = type_of(v);
      if (!t.tensor || t.elem == 0) continue;
      const std::string name = value_name(v);
      int64_t size = numel_at(t, dims) * static_cast<int64_t>(std::max<size_t>(element_bytes(t.elem, 1), 1));
      size += static_cast<int64_t>(pad(static_cast<size_t>(size)));
      auto lu = last_use.find(name);
      const size_t last = outputs.count(name) ? nodes.size() : (lu != last_use.end() ? lu->second : step);
      std::vector<Live> sorted = live;
      std::sort(sorted.begin(), sorted.end(), [](const Live& a, const Live& b) {
        return std::tie(a.offset, a.size, a.last) < std::tie(b.offset, b.size, b.last);
      });
      int64_t offset = 0;
      for (const Live& b : sorted) {
        if (offset + size <= b.offset) break;
        offset = std::max(offset, b.offset + b.size);
      }
      live.push_back({offset, size, last});
      arena = std::max(arena, offset + size);
      Json buffer = Json::object();
      buffer.set("value", Json::of(name));
      buffer.set("offset", Json::of(static_cast<double>(offset)));
      buffer.set("bytes", Json::of(static_cast<double>(size)));
      buffer.set("first", Json::of(static_cast<double>(step)));
      buffer.set("last", Json::of(static_cast<double>(last)));
      buffers.push(std::move(buffer));
    }
  }
  Json plan = Json::object();
  plan.set("arena_bytes", Json::of(static_cast<double>(arena)));
  plan.set("buffers", std::move(buffers));
  Json d = Json::object();
  for (const auto& [k, v] : dims) d.set(k, Json::of(static_cast<double>(v)));
  plan.set("dims", std::move(d));
  return plan;
}

}  // namespace

std::string write_program(const OrtGraph* graph, const std::string& partition, const std::string& device,
                          const std::map<std::string, int64_t>& dims) {
  std::vector<Weight> weights;
  std::vector<std::string> input_names, output_names;
  std::shared_ptr<std::vector<std::vector<uint8_t>>> store;
  const std::string graph_bytes = serialize_graph(graph, weights, input_names, output_names, store, false);

  size_t n = 0;
  check(ort->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(ort->Graph_GetNodes(graph, nodes.data(), n));

  // Weights in first-appearance order over the schedule; MX roles from blocked DequantizeLinear consumers.
  std::map<std::string, const Weight*> by_name;
  for (const Weight& w : weights) by_name[w.name] = &w;
  std::vector<const Weight*> ordered;
  std::set<std::string> seen;
  std::map<std::string, std::string> role;  // first blocked-DequantizeLinear use: "elements" or "scale"
  std::map<std::string, const OrtValueInfo*> io_values;
  Json schedule = Json::list();
  for (const OrtNode* node : nodes) {
    schedule.push(Json::of(str_of(node, ort->Node_GetName)));
    int64_t block = 0;
    const bool blocked = str_of(node, ort->Node_GetOperatorType) == "DequantizeLinear" &&
                         read_int_attr(node, "block_size", block) && block > 0;
    auto inputs = node_values(node, true);
    for (size_t k = 0; k < inputs.size(); ++k) {
      if (inputs[k] == nullptr) continue;
      const std::string name = value_name(inputs[k]);
      io_values.emplace(name, inputs[k]);
      if (blocked && k < 2 && !role.count(name)) role[name] = k == 0 ? "elements" : "scale";
      if (by_name.count(name) && seen.insert(name).second) ordered.push_back(by_name[name]);
    }
    for (const OrtValueInfo* v : node_values(node, false))
      if (v) io_values.emplace(value_name(v), v);
  }

  Json weight_specs = Json::list();
  std::vector<std::string> e8m0(ordered.size());
  std::vector<bool> is_e8m0(ordered.size(), false);
  size_t offset = graph_bytes.size() + pad(graph_bytes.size());
  for (size_t k = 0; k < ordered.size(); ++k) {
    const Weight& w = *ordered[k];
    std::string format = device_format(w.dtype);
    if (role.count(w.name) && role[w.name] == "elements") format = "mx-elements-" + format;
    else if (role.count(w.name) && role[w.name] == "scale" && e8m0_exponents(w, &e8m0[k])) {
      format = "e8m0";
      is_e8m0[k] = true;
    }
    const size_t length = is_e8m0[k] ? e8m0[k].size() : w.nbytes;
    Json spec = Json::object();
    spec.set("name", Json::of(w.name));
    spec.set("dtype", Json::of(element_type_name(w.dtype)));
    Json shape = Json::list();
    for (int64_t d : w.shape) shape.push(Json::of(static_cast<double>(d)));
    spec.set("shape", std::move(shape));
    spec.set("format", Json::of(format));
    spec.set("offset", Json::of(static_cast<double>(offset)));
    spec.set("length", Json::of(static_cast<double>(length)));
    weight_specs.push(std::move(spec));
    offset += length + pad(length);
  }

  Json inputs = Json::list(), outputs = Json::list();
  for (const std::string& name : input_names) inputs.push(value_spec(name, io_values.count(name) ? io_values[name] : nullptr));
  for (const std::string& name : output_names)
    outputs.push(value_spec(name, io_values.count(name) ? io_values[name] : nullptr));
  Json graph_span = Json::object();
  graph_span.set("offset", Json::of(0.0));
  graph_span.set("length", Json::of(static_cast<double>(graph_bytes.size())));
  Json plan = Json::object();
  plan.set("schedule", std::move(schedule));
  plan.set("memory", memory_plan(nodes, std::set<std::string>(output_names.begin(), output_names.end()), dims));
  plan.set("estimate", Json::object());
  Json header = Json::object();
  header.set("format_version", Json::of(1.0));
  header.set("partition_name", Json::of(partition));
  header.set("device", Json::of(device));
  header.set("compiler", Json::of("MaiaExecutionProvider (ONNX Runtime compile API)"));
  header.set("inputs", std::move(inputs));
  header.set("outputs", std::move(outputs));
  header.set("graph", std::move(graph_span));
  header.set("weights", std::move(weight_specs));
  header.set("plan", std::move(plan));
  const std::string header_json = header.dump();

  std::string out = "MAIAPRG1";
  const uint64_t header_length = header_json.size();
  out.append(reinterpret_cast<const char*>(&header_length), 8);  // little-endian hosts only (x86-64, aarch64)
  out += header_json;
  out.append(pad(out.size()), '\0');
  out.reserve(out.size() + offset);
  out += graph_bytes;
  out.append(pad(graph_bytes.size()), '\0');
  for (size_t k = 0; k < ordered.size(); ++k) {
    const Weight& w = *ordered[k];
    if (is_e8m0[k]) out += e8m0[k];
    else out.append(reinterpret_cast<const char*>(w.data), w.nbytes);
    const size_t length = is_e8m0[k] ? e8m0[k].size() : w.nbytes;
    out.append(pad(length), '\0');
  }
  return out;
}

void write_container(const std::string& path, const std::vector<std::pair<std::string, std::string>>& programs) {
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw Error("cannot write Maia context side file " + tmp + ": check the output directory", ORT_FAIL);
    std::string head = "MAIACTX1";
    head.append(kAlign - head.size(), '\0');
    f.write(head.data(), static_cast<std::streamsize>(head.size()));
    Json index = Json::object();
    size_t offset = kAlign;
    for (const auto& [name, bytes] : programs) {
      f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      Json entry = Json::list();
      entry.push(Json::of(static_cast<double>(offset)));
      entry.push(Json::of(static_cast<double>(bytes.size())));
      index.set(name, std::move(entry));
      offset += bytes.size();
    }
    const std::string footer = index.dump();
    const uint64_t length = footer.size();
    f.write(footer.data(), static_cast<std::streamsize>(footer.size()));
    f.write(reinterpret_cast<const char*>(&length), 8);
    f.write("MAIACTX1", 8);
    f.flush();
    if (!f) {
      std::remove(tmp.c_str());
      throw Error("writing Maia context side file " + tmp + " failed (disk full?)", ORT_FAIL);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot move Maia context side file into place at " + path, ORT_FAIL);
  }
}

}  // namespace maia
