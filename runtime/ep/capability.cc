// GetCapability for plain models, from the one capability table (runtime/capability_table.json) and the device
// profiles (runtime/devices/*.json, $MAIA_ONNX_PROFILE_PATH): the same node rules and the same level-based
// partitioner as maia_onnx.runtime.capability, and the serializer that turns a fused partition into an ONNX
// model for the engine.
#include <dirent.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>

#include "maia_ep.h"
#include "proto.h"

namespace maia {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path, ORT_NO_SUCHFILE);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string node_str(const OrtNode* node, OrtStatus* (*getter)(const OrtNode*, const char**)) {
  const char* s = nullptr;
  check(getter(node, &s));
  return s ? s : "";
}

std::string canonical(const CapabilityTable& table, int32_t elem) {
  auto it = table.canonical.find(element_type_name(elem));
  if (it != table.canonical.end()) return it->second;
  std::string name = element_type_name(elem);
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  return name;
}

// Why ``node`` cannot run on the device ("" when it can); see capability.node_reason.
std::string node_reason(const OrtNode* node, const CapabilityTable& table, const DeviceProfile& profile,
                        const std::set<std::string>& cpu_ops) {
  std::string op = node_str(node, ort->Node_GetOperatorType);
  std::string domain = node_str(node, ort->Node_GetDomain);
  if (domain == "ai.onnx") domain.clear();
  if (cpu_ops.count(op)) return "op excluded by the user (cpu_ops)";
  size_t subgraphs = 0;
  check(ort->Node_GetNumSubgraphs(node, &subgraphs));
  if (subgraphs) return "control-flow op (subgraphs run on the host)";
  auto rule_it = table.rules.find({domain, op});
  if (rule_it == table.rules.end()) return "unsupported op";
  if (!domain.empty() && domain != "com.microsoft")
    return "model-local function (ORT inlines it; its body ops are placed one by one)";
  const Rule& rule = rule_it->second;
  auto inputs = node_values(node, true);
  auto outputs = node_values(node, false);
  std::vector<const OrtValueInfo*> values(inputs);
  values.insert(values.end(), outputs.begin(), outputs.end());
  for (const OrtValueInfo* value : values) {
    if (value == nullptr) continue;
    TypeInfo t = type_of(value);
    if (!t.tensor) return "non-tensor value";
    std::string canon = canonical(table, t.elem);
    if (!rule.dtypes.count(canon)) return "dtype " + canon + " unsupported";
    if (table.tensor_precision.count(canon) && !profile.supports_precision(canon))
      return "dtype " + canon + " has no tensor format on " + profile.name;
  }
  if (rule.max_spatial_dims >= 0 && inputs.size() > 1 && inputs[1] != nullptr) {
    TypeInfo w = type_of(inputs[1]);
    if (static_cast<int>(w.dims.size()) - 2 > rule.max_spatial_dims) return "too many spatial dims";
  }
  size_t num_attrs = 0;
  check(ort->Node_GetNumAttributes(node, &num_attrs));
  std::vector<const OrtOpAttr*> attrs(num_attrs);
  if (num_attrs) check(ort->Node_GetAttributes(node, attrs.data(), num_attrs));
  for (const OrtOpAttr* a : attrs) {
    OrtOpAttrType type;
    check(ort->OpAttr_GetType(a, &type));
    if (type == ORT_OP_ATTR_STRINGS || type == ORT_OP_ATTR_GRAPH) return "attribute type the EP cannot forward";
  }
  if (!rule.attribute.empty()) {
    std::string value = rule.attribute_default;
    read_string_attr(node, rule.attribute.c_str(), value);
    if (std::find(rule.allowed.begin(), rule.allowed.end(), value) == rule.allowed.end())
      return "attribute " + rule.attribute + "=" + value + " unsupported";
  }
  return "";
}

}  // namespace

TypeInfo type_of(const OrtValueInfo* value) {
  TypeInfo out;
  const OrtTypeInfo* type = nullptr;
  check(ort->GetValueInfoTypeInfo(value, &type));
  if (type == nullptr) return out;
  ONNXType onnx_type;
  check(ort->GetOnnxTypeFromTypeInfo(type, &onnx_type));
  if (onnx_type != ONNX_TYPE_TENSOR) return out;
  const OrtTensorTypeAndShapeInfo* info = nullptr;
  check(ort->CastTypeInfoToTensorInfo(type, &info));
  if (info == nullptr) return out;
  out.tensor = true;
  ONNXTensorElementDataType elem;
  check(ort->GetTensorElementType(info, &elem));
  out.elem = static_cast<int32_t>(elem);
  size_t rank = 0;
  check(ort->GetDimensionsCount(info, &rank));
  out.dims.resize(rank);
  check(ort->GetDimensions(info, out.dims.data(), rank));
  std::vector<const char*> symbols(rank, nullptr);
  check(ort->GetSymbolicDimensions(info, symbols.data(), rank));
  for (const char* s : symbols) out.symbols.push_back(s ? s : "");
  return out;
}

std::vector<const OrtValueInfo*> node_values(const OrtNode* node, bool inputs) {
  size_t n = 0;
  check(inputs ? ort->Node_GetNumInputs(node, &n) : ort->Node_GetNumOutputs(node, &n));
  std::vector<const OrtValueInfo*> values(n, nullptr);
  if (n) check(inputs ? ort->Node_GetInputs(node, values.data(), n) : ort->Node_GetOutputs(node, values.data(), n));
  return values;
}

std::string value_name(const OrtValueInfo* value) {
  const char* name = nullptr;
  check(ort->GetValueInfoName(value, &name));
  return name ? name : "";
}

bool read_bytes_attr(const OrtNode* node, const char* name, std::string& out) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* status = ort->Node_GetAttributeByName(node, name, &attr);
  if (status) {
    ort->ReleaseStatus(status);
    return false;
  }
  if (attr == nullptr) return false;
  out = read_attr(attr, ORT_OP_ATTR_STRING);
  return true;
}

bool read_string_attr(const OrtNode* node, const char* name, std::string& out) {
  if (!read_bytes_attr(node, name, out)) return false;
  while (!out.empty() && out.back() == '\0') out.pop_back();  // text never ends in NUL; some ORT versions add one
  return true;
}

std::string read_attr(const OrtOpAttr* attr, OrtOpAttrType type) {
  // ReadOpAttr reports the size it needs; ORT 1.23 counts (and writes) a NUL after a STRING, later versions do not
  size_t size = 0;
  OrtStatus* status = ort->ReadOpAttr(attr, type, nullptr, 0, &size);
  if (status) ort->ReleaseStatus(status);
  std::string buf(size + 1, '\0');
  check(ort->ReadOpAttr(attr, type, buf.data(), buf.size(), &size));
  buf.resize(std::min(size, buf.size()));
  return buf;
}

bool read_int_attr(const OrtNode* node, const char* name, int64_t& out) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* status = ort->Node_GetAttributeByName(node, name, &attr);
  if (status) {
    ort->ReleaseStatus(status);
    return false;
  }
  if (attr == nullptr) return false;
  size_t size = 0;
  check(ort->ReadOpAttr(attr, ORT_OP_ATTR_INT, &out, sizeof(out), &size));
  return true;
}

CapabilityTable CapabilityTable::load(const std::string& path) {
  Json j = Json::parse(read_file(path));
  CapabilityTable t;
  for (const auto& [name, canon] : j["canonical_dtypes"].obj) t.canonical[name] = canon.as_str();
  for (const Json& d : j["tensor_precision"].arr) t.tensor_precision.insert(d.as_str());
  for (const Json& d : j["compute_kinds"].arr) t.compute_kinds.insert(d.as_str());
  const Json& groups = j["dtype_groups"];
  for (const Json& row : j["rules"].arr) {
    Rule rule;
    rule.kind = row["kind"].as_str();
    for (const Json& entry : row["dtypes"].arr) {
      if (groups.has(entry.as_str()))
        for (const Json& d : groups[entry.as_str()].arr) rule.dtypes.insert(d.as_str());
      else
        rule.dtypes.insert(entry.as_str());
    }
    if (row.has("max_spatial_dims")) rule.max_spatial_dims = static_cast<int>(row["max_spatial_dims"].as_int());
    if (row.has("attribute")) {
      rule.attribute = row["attribute"]["name"].as_str();
      rule.attribute_default = row["attribute"]["default"].as_str();
      for (const Json& a : row["attribute"]["allowed"].arr) rule.allowed.push_back(a.as_str());
    }
    std::string domain = row.has("domain") ? row["domain"].as_str() : "";
    for (const Json& op : row["ops"].arr) t.rules[{domain, op.as_str()}] = rule;
  }
  return t;
}

bool DeviceProfile::supports_precision(const std::string& canon) const {
  std::string dtype = canon;
  std::set<std::string> seen;
  while (compute_dtype_map.count(dtype) && !seen.count(dtype)) {
    seen.insert(dtype);
    dtype = compute_dtype_map.at(dtype);
  }
  return peak_dtypes.count(dtype) > 0;
}

std::vector<DeviceProfile> load_profiles(const std::string& builtin_dir) {
  // profiles.py lookup order: $MAIA_ONNX_PROFILE_PATH entries (their devices/ folder, then the entry), built-ins.
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("MAIA_ONNX_PROFILE_PATH")) {
    std::stringstream ss(env);
    std::string entry;
    while (std::getline(ss, entry, ':'))
      if (!entry.empty()) {
        dirs.push_back(entry + "/devices");
        dirs.push_back(entry);
      }
  }
  dirs.push_back(builtin_dir);
  std::map<std::string, DeviceProfile> found;
  for (const std::string& dir : dirs) {
    DIR* d = opendir(dir.c_str());
    if (!d) continue;
    std::vector<std::string> files;
    while (dirent* e = readdir(d)) {
      std::string f = e->d_name;
      if (f.size() > 5 && f.compare(f.size() - 5, 5, ".json") == 0) files.push_back(f);
    }
    closedir(d);
    std::sort(files.begin(), files.end());
    for (const std::string& f : files) {
      std::string stem = f.substr(0, f.size() - 5);
      if (found.count(stem)) continue;  // an earlier directory wins, as in profiles._resolve
      try {
        Json j = Json::parse(read_file(dir + "/" + f));
        if (j.has("kind") && j["kind"].str != "device") continue;
        if (!j.has("peak_flops")) continue;
        DeviceProfile p;
        p.name = stem;
        p.path = dir + "/" + f;
        p.description = j["description"].str;
        for (const auto& [dtype, _] : j["peak_flops"].obj) p.peak_dtypes.insert(dtype);
        for (const auto& [k, v] : j["compute_dtype_map"].obj)
          if (v.kind == Json::String) p.compute_dtype_map[k] = v.str;
        found[stem] = p;
      } catch (const std::exception&) {
        continue;  // not a device profile (profiles.py skips unreadable files the same way)
      }
    }
  }
  std::vector<DeviceProfile> out;
  for (auto& [name, p] : found) out.push_back(p);
  // the default device first, then the others by name
  std::stable_sort(out.begin(), out.end(), [](const DeviceProfile& a, const DeviceProfile& b) {
    return (a.name == "maia100") > (b.name == "maia100");
  });
  return out;
}

namespace {

bool is_narrow(int32_t elem) { return elem >= 17 && elem <= 24; }  // FP8, 4-bit, E8M0

// EPContext nodes (com.microsoft schema) take and give only 8-64-bit ints and 16-64-bit floats. A compile
// through ORT cannot add the host-side widening casts the Python compiler adds, so a node that would take a
// narrow value from outside its partition, or hand one out, stays on the host. True when a node was demoted.
bool demote_narrow_boundaries(const std::vector<const OrtNode*>& nodes, const std::map<size_t, size_t>& index,
                              const std::vector<std::vector<size_t>>& groups, std::vector<bool>& on_device) {
  std::vector<int> group_of(nodes.size(), -1);
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t i : groups[g]) group_of[i] = static_cast<int>(g);
  auto group_of_node = [&](const OrtNode* node) {
    if (node == nullptr) return -1;
    size_t id = 0;
    check(ort->Node_GetId(node, &id));
    auto it = index.find(id);
    return it == index.end() ? -1 : group_of[it->second];
  };
  bool demoted = false;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (!on_device[i]) continue;
    bool boundary = false;
    for (const OrtValueInfo* v : node_values(nodes[i], true)) {
      if (v == nullptr || !is_narrow(type_of(v).elem)) continue;
      bool constant = false;
      check(ort->ValueInfo_IsConstantInitializer(v, &constant));
      const OrtNode* producer = nullptr;
      size_t output_index = 0;
      check(ort->ValueInfo_GetValueProducer(v, &producer, &output_index));
      if (!constant && group_of_node(producer) != group_of[i]) boundary = true;
    }
    for (const OrtValueInfo* v : node_values(nodes[i], false)) {
      if (boundary || v == nullptr || !is_narrow(type_of(v).elem)) continue;
      bool graph_output = false;
      check(ort->ValueInfo_IsGraphOutput(v, &graph_output));
      size_t count = 0;
      check(ort->ValueInfo_GetValueNumConsumers(v, &count));
      std::vector<const OrtNode*> consumers(count);
      std::vector<int64_t> input_indices(count);
      if (count) check(ort->ValueInfo_GetValueConsumers(v, consumers.data(), input_indices.data(), count));
      for (const OrtNode* c : consumers)
        if (group_of_node(c) != group_of[i]) boundary = true;
      if (graph_output) boundary = true;
    }
    if (boundary) {
      on_device[i] = false;
      demoted = true;
    }
  }
  return demoted;
}

}  // namespace

std::vector<std::vector<const OrtNode*>> plain_partitions(const OrtGraph* graph, const CapabilityTable& table,
                                                          const DeviceProfile& profile,
                                                          const std::set<std::string>& cpu_ops, bool wide_boundaries) {
  size_t n = 0;
  check(ort->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(ort->Graph_GetNodes(graph, nodes.data(), n));  // stable topological order
  std::map<size_t, size_t> index;
  for (size_t i = 0; i < n; ++i) {
    size_t id = 0;
    check(ort->Node_GetId(nodes[i], &id));
    index[id] = i;
  }
  std::vector<std::vector<size_t>> preds(n);
  std::vector<std::string> kinds(n);
  std::vector<bool> on_device(n, false);
  for (size_t i = 0; i < n; ++i) {
    for (const OrtValueInfo* v : node_values(nodes[i], true)) {
      if (v == nullptr) continue;
      const OrtNode* producer = nullptr;
      size_t output_index = 0;
      check(ort->ValueInfo_GetValueProducer(v, &producer, &output_index));
      if (producer == nullptr) continue;
      size_t id = 0;
      check(ort->Node_GetId(producer, &id));
      auto it = index.find(id);
      if (it != index.end()) preds[i].push_back(it->second);
    }
    on_device[i] = node_reason(nodes[i], table, profile, cpu_ops).empty();
    if (on_device[i]) {
      std::string domain = node_str(nodes[i], ort->Node_GetDomain);
      if (domain == "ai.onnx") domain.clear();
      kinds[i] = table.rules.at({domain, node_str(nodes[i], ort->Node_GetOperatorType)}).kind;
    }
  }
  // Partitions: connected components of device-device edges among nodes of equal level, where a node's level is
  // the most device->CPU hand-offs on any path to it (no partition can form a cycle through CPU nodes).
  auto group = [&]() {
    std::vector<int> level(n, 0);
    for (size_t i = 0; i < n; ++i)
      for (size_t p : preds[i]) level[i] = std::max(level[i], level[p] + (on_device[p] && !on_device[i] ? 1 : 0));
    std::vector<size_t> parent(n);
    for (size_t i = 0; i < n; ++i) parent[i] = i;
    std::function<size_t(size_t)> find = [&](size_t x) {
      while (parent[x] != x) x = parent[x] = parent[parent[x]];
      return x;
    };
    for (size_t i = 0; i < n; ++i)
      if (on_device[i])
        for (size_t p : preds[i])
          if (on_device[p] && level[p] == level[i]) parent[find(p)] = find(i);
    std::map<size_t, std::vector<size_t>> comps;
    for (size_t i = 0; i < n; ++i)
      if (on_device[i]) comps[find(i)].push_back(i);
    std::vector<std::vector<size_t>> out;
    for (auto& [_, members] : comps) out.push_back(members);
    std::sort(out.begin(), out.end());
    return out;
  };
  std::vector<std::vector<size_t>> groups;
  while (true) {  // demote partitions that compute nothing (only shapes/constants/reshapes)
    groups = group();
    bool demoted = false;
    for (const auto& members : groups) {
      bool compute = std::any_of(members.begin(), members.end(),
                                 [&](size_t i) { return table.compute_kinds.count(kinds[i]) > 0; });
      if (!compute) {
        for (size_t i : members) on_device[i] = false;
        demoted = true;
      }
    }
    if (!demoted && wide_boundaries) demoted = demote_narrow_boundaries(nodes, index, groups, on_device);
    if (!demoted) break;
  }
  std::vector<std::vector<const OrtNode*>> out;
  for (const auto& members : groups) {
    std::vector<const OrtNode*> part;
    for (size_t i : members) part.push_back(nodes[i]);
    out.push_back(part);
  }
  return out;
}

namespace {

std::string value_info_proto(const std::string& name, const TypeInfo& t) {
  pb::Writer shape;
  for (size_t i = 0; i < t.dims.size(); ++i) {
    pb::Writer dim;
    if (t.dims[i] >= 0) dim.int_field(1, t.dims[i]);
    else if (!t.symbols[i].empty()) dim.bytes_field(2, t.symbols[i]);
    shape.bytes_field(1, dim.out);
  }
  pb::Writer tensor;
  tensor.int_field(1, t.elem);
  // ORT reports an unknown rank as rank 0: leave the shape out rather than declare a scalar (a scalar only loses
  // its static rank, while a wrong one fails the inner session's shape inference)
  if (!t.dims.empty()) tensor.bytes_field(2, shape.out);
  pb::Writer type;
  type.bytes_field(1, tensor.out);
  pb::Writer value;
  value.bytes_field(1, name);
  value.bytes_field(2, type.out);
  return value.out;
}

std::string tensor_from_value(const std::string& name, const OrtValue* value) {
  const TensorLayout t = describe_tensor(value, "tensor attributes");
  const void* data = nullptr;
  check(ort->GetTensorData(value, &data));
  pb::Writer w;
  for (int64_t d : t.dims) w.int_field(1, d);
  w.int_field(2, t.elem);
  if (!name.empty()) w.bytes_field(8, name);
  w.bytes_field(9, data, t.bytes);
  return w.out;
}

// Calls ``emit`` on each value of an attribute array as ORT packs it: native-endian T after T.
template <typename T, typename Emit>
void for_each_packed(const std::string& buf, Emit emit) {
  for (size_t i = 0; i + sizeof(T) <= buf.size(); i += sizeof(T)) {
    T v;
    std::memcpy(&v, buf.data() + i, sizeof(T));
    emit(v);
  }
}

std::string attribute_proto(const OrtOpAttr* attr) {
  const char* name = nullptr;
  check(ort->OpAttr_GetName(attr, &name));
  OrtOpAttrType type;
  check(ort->OpAttr_GetType(attr, &type));
  pb::Writer w;
  w.bytes_field(1, std::string(name));
  auto read = [&](OrtOpAttrType t) { return read_attr(attr, t); };
  switch (type) {
    case ORT_OP_ATTR_INT: {
      int64_t v = 0;
      size_t size = 0;
      check(ort->ReadOpAttr(attr, type, &v, sizeof(v), &size));
      w.int_field(3, v);
      w.int_field(20, 2);
      break;
    }
    case ORT_OP_ATTR_FLOAT: {
      float v = 0;
      size_t size = 0;
      check(ort->ReadOpAttr(attr, type, &v, sizeof(v), &size));
      w.float_field(2, v);
      w.int_field(20, 1);
      break;
    }
    case ORT_OP_ATTR_STRING: {
      std::string s = read(type);
      while (!s.empty() && s.back() == '\0') s.pop_back();  // the NUL some ORT versions append
      w.bytes_field(4, s);
      w.int_field(20, 3);
      break;
    }
    case ORT_OP_ATTR_INTS:
      for_each_packed<int64_t>(read(type), [&](int64_t v) { w.int_field(8, v); });
      w.int_field(20, 7);
      break;
    case ORT_OP_ATTR_FLOATS:
      for_each_packed<float>(read(type), [&](float v) { w.float_field(7, v); });
      w.int_field(20, 6);
      break;
    case ORT_OP_ATTR_TENSOR: {
      OrtValue* value = nullptr;
      check(ort->OpAttr_GetTensorAttributeAsOrtValue(attr, &value));
      std::unique_ptr<OrtValue, void (*)(OrtValue*)> hold(value, ort->ReleaseValue);
      w.bytes_field(5, tensor_from_value("", value));
      w.int_field(20, 4);
      break;
    }
    default: throw Error(std::string("attribute ") + name + " of an unsupported type in a device partition");
  }
  return w.out;
}

}  // namespace

std::string serialize_graph(const OrtGraph* graph, std::vector<Weight>& weights, std::vector<std::string>& inputs,
                            std::vector<std::string>& outputs,
                            std::shared_ptr<std::vector<std::vector<uint8_t>>>& store, bool copy_weights) {
  store = std::make_shared<std::vector<std::vector<uint8_t>>>();
  pb::Writer g;
  size_t n = 0;
  check(ort->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(ort->Graph_GetNodes(graph, nodes.data(), n));
  for (const OrtNode* node : nodes) {
    pb::Writer w;
    for (const OrtValueInfo* v : node_values(node, true)) w.bytes_field(1, v ? value_name(v) : std::string());
    for (const OrtValueInfo* v : node_values(node, false)) w.bytes_field(2, v ? value_name(v) : std::string());
    w.bytes_field(3, node_str(node, ort->Node_GetName));
    w.bytes_field(4, node_str(node, ort->Node_GetOperatorType));
    size_t num_attrs = 0;
    check(ort->Node_GetNumAttributes(node, &num_attrs));
    std::vector<const OrtOpAttr*> attrs(num_attrs);
    if (num_attrs) check(ort->Node_GetAttributes(node, attrs.data(), num_attrs));
    for (const OrtOpAttr* a : attrs) w.bytes_field(5, attribute_proto(a));
    w.bytes_field(7, node_str(node, ort->Node_GetDomain));
    g.bytes_field(1, w.out);
  }
  g.bytes_field(2, std::string("maia_partition"));

  size_t num_init = 0;
  check(ort->Graph_GetNumInitializers(graph, &num_init));
  std::vector<const OrtValueInfo*> inits(num_init);
  if (num_init) check(ort->Graph_GetInitializers(graph, inits.data(), num_init));
  std::set<std::string> init_names;
  for (const OrtValueInfo* v : inits) {
    const OrtValue* value = nullptr;
    check(ort->ValueInfo_GetInitializerValue(v, &value));
    if (value == nullptr) continue;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(ort->GetTensorTypeAndShape(value, &info));
    std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> hold(
        info, ort->ReleaseTensorTypeAndShapeInfo);
    ONNXTensorElementDataType elem;
    check(ort->GetTensorElementType(info, &elem));
    Weight w;
    w.name = value_name(v);
    w.dtype = static_cast<int32_t>(elem);
    size_t rank = 0;
    check(ort->GetDimensionsCount(info, &rank));
    w.shape.resize(rank);
    check(ort->GetDimensions(info, w.shape.data(), rank));
    size_t bytes = 0;
    check(ort->GetTensorSizeInBytes(value, &bytes));
    const void* data = nullptr;
    check(ort->GetTensorData(value, &data));
    if (copy_weights) {
      // ORT frees its initializers once the partition is compiled (drop_constant_initializers): keep a copy
      store->emplace_back(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
      w.data = store->back().data();
    } else {
      w.data = static_cast<const uint8_t*>(data);  // valid while Compile runs (the program writer copies it)
    }
    w.nbytes = bytes;
    init_names.insert(w.name);
    weights.push_back(std::move(w));
  }

  size_t num_inputs = 0, num_outputs = 0;
  check(ort->Graph_GetNumInputs(graph, &num_inputs));
  check(ort->Graph_GetNumOutputs(graph, &num_outputs));
  std::vector<const OrtValueInfo*> ins(num_inputs), outs(num_outputs);
  if (num_inputs) check(ort->Graph_GetInputs(graph, ins.data(), num_inputs));
  if (num_outputs) check(ort->Graph_GetOutputs(graph, outs.data(), num_outputs));
  for (const OrtValueInfo* v : ins) {
    std::string name = value_name(v);
    if (init_names.count(name)) continue;
    g.bytes_field(11, value_info_proto(name, type_of(v)));
    inputs.push_back(name);
  }
  for (const OrtValueInfo* v : outs) {
    std::string name = value_name(v);
    g.bytes_field(12, value_info_proto(name, type_of(v)));
    outputs.push_back(name);
  }

  pb::Writer model;
  int64_t ir_version = 0;
  check(ort->Graph_GetOnnxIRVersion(graph, &ir_version));
  model.int_field(1, ir_version);
  model.bytes_field(2, std::string("maia-onnx-ep"));
  size_t num_opsets = 0;
  check(ort->Graph_GetNumOperatorSets(graph, &num_opsets));
  std::vector<const char*> domains(num_opsets);
  std::vector<int64_t> versions(num_opsets);
  if (num_opsets) check(ort->Graph_GetOperatorSets(graph, domains.data(), versions.data(), num_opsets));
  model.bytes_field(7, g.out);
  for (size_t i = 0; i < num_opsets; ++i) {
    pb::Writer opset;
    opset.bytes_field(1, std::string(domains[i] ? domains[i] : ""));
    opset.int_field(2, versions[i]);
    model.bytes_field(8, opset.out);
  }
  return model.out;
}

}  // namespace maia
