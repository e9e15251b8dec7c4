// MaiaExecutionProvider as an ONNX Runtime plugin EP library (OrtEpFactory / OrtEp, onnxruntime_ep_c_api.h).
//
// Load with onnxruntime.register_execution_provider_library("MaiaExecutionProvider", path) (maia_onnx.runtime
// .register() does it). The factory offers one EP device per Maia device profile on the host CPU, with the profile
// name in the device metadata (maia.device). Session options (ORT lower-cases the EP name):
//   ep.maiaexecutionprovider.device   device profile (default: the chosen EP device's profile)
//   ep.maiaexecutionprovider.cpu_ops  comma-separated op types kept on the CPU (plain models)
//   ep.maiaexecutionprovider.dims     symbolic dims for the programs' memory plans, e.g. "batch=1,seq=128"
// GetCapability claims the Maia EPContext nodes of compiled models, and for plain models the partitions the
// capability table allows; Compile loads each partition into an Engine (engine.cc). When ORT compiles to an
// EPContext model (ModelCompiler; ep.context_enable=1), Compile writes each partition as a Maia program
// (program_writer.cc, the format of runtime/compile.py) and returns one EPContext node per partition: the program
// embedded (ep.context_embed_mode=1) or in <output stem>_maia.bin beside the output model (MAIACTX1 side file).
#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>

#include "maia_ep.h"

namespace maia {

const OrtApi* ort = nullptr;
const OrtEpApi* ep_api = nullptr;

void check(OrtStatus* status) {
  if (status == nullptr) return;
  std::string message = ort->GetErrorMessage(status);
  OrtErrorCode code = ort->GetErrorCode(status);
  ort->ReleaseStatus(status);
  throw Error(message, code);
}

TensorLayout describe_tensor(const OrtValue* value, const char* what) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(ort->GetTensorTypeAndShape(value, &info));
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> hold(
      info, ort->ReleaseTensorTypeAndShapeInfo);
  TensorLayout layout;
  check(ort->GetTensorElementType(info, &layout.elem));
  if (layout.elem == ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING) throw Error(std::string("string ") + what + " are not supported");
  size_t rank = 0;
  check(ort->GetDimensionsCount(info, &rank));
  layout.dims.resize(rank);
  check(ort->GetDimensions(info, layout.dims.data(), rank));
  check(ort->GetTensorSizeInBytes(value, &layout.bytes));
  return layout;
}

#define MAIA_TRY try {
#define MAIA_CATCH                                                 \
  }                                                                \
  catch (const Error& e) {                                         \
    return ort->CreateStatus(e.code, e.what());                    \
  }                                                                \
  catch (const std::exception& e) {                                \
    return ort->CreateStatus(ORT_EP_FAIL, e.what());               \
  }

namespace {

constexpr const char* kVersion = "0.1.0";

std::string library_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&library_dir), &info) == 0 || info.dli_fname == nullptr) return ".";
  std::string path = info.dli_fname;
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::string session_option(const OrtSessionOptions* options, const std::string& key, const std::string& fallback) {
  int has = 0;
  check(ort->HasSessionConfigEntry(options, key.c_str(), &has));
  if (!has) return fallback;
  size_t size = 0;
  OrtStatus* status = ort->GetSessionConfigEntry(options, key.c_str(), nullptr, &size);
  if (status) ort->ReleaseStatus(status);
  std::string value(size, '\0');
  check(ort->GetSessionConfigEntry(options, key.c_str(), value.data(), &size));
  value.resize(std::min(size, value.size()));
  while (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

std::string node_op(const OrtNode* node) {
  const char* s = nullptr;
  check(ort->Node_GetOperatorType(node, &s));
  return s ? s : "";
}

std::string node_domain(const OrtNode* node) {
  const char* s = nullptr;
  check(ort->Node_GetDomain(node, &s));
  return s ? s : "";
}

std::string node_name(const OrtNode* node) {
  const char* s = nullptr;
  check(ort->Node_GetName(node, &s));
  return s ? s : "";
}

bool is_maia_context(const OrtNode* node) {
  if (node_op(node) != "EPContext" || node_domain(node) != "com.microsoft") return false;
  std::string source;
  return read_string_attr(node, "source", source) && source == kEpName;
}

std::vector<std::string> io_names(const OrtNode* node, bool inputs) {
  size_t n = 0;
  check(inputs ? ort->Node_GetNumInputs(node, &n) : ort->Node_GetNumOutputs(node, &n));
  std::vector<const OrtValueInfo*> values(n, nullptr);
  if (n) check(inputs ? ort->Node_GetInputs(node, values.data(), n) : ort->Node_GetOutputs(node, values.data(), n));
  std::vector<std::string> names;
  for (const OrtValueInfo* v : values) names.push_back(v ? value_name(v) : "");
  return names;
}

std::vector<size_t> slots(const std::vector<std::string>& wanted, const std::vector<std::string>& available,
                          const std::string& what) {
  std::vector<size_t> out;
  for (const std::string& name : wanted) {
    auto it = std::find(available.begin(), available.end(), name);
    if (it == available.end()) throw Error("Maia partition " + what + " " + name + " is not wired to the fused node");
    out.push_back(static_cast<size_t>(it - available.begin()));
  }
  return out;
}

struct Kernel {
  std::unique_ptr<Engine> engine;
  std::vector<size_t> in_slots, out_slots;
};

class Factory;

// How ORT asked for an EPContext model (session options of the compile API).
struct ContextOptions {
  bool enable = false;
  bool embed = true;
  std::string model_path;                // the output model (ep.context_file_path); side files go beside it
  std::map<std::string, int64_t> dims;   // for the memory plans
};

constexpr size_t kEmbedLimitBytes = 1500000000;  // runtime/compile.py EMBED_LIMIT_BYTES: protobuf's 2 GiB cap

class Ep : public OrtEp {
 public:
  Ep(Factory& factory, DeviceProfile profile, std::set<std::string> cpu_ops, ContextOptions context,
     const OrtLogger* logger);

  Factory& factory;
  DeviceProfile profile;
  std::set<std::string> cpu_ops;
  ContextOptions context;
  size_t next_partition = 0;
  const OrtLogger* logger;
  SideFiles side_files;
  std::mutex mutex;
  std::map<std::string, std::unique_ptr<Kernel>> kernels;

  void log(OrtLoggingLevel level, const std::string& message) const {
    OrtStatus* s = ort->Logger_LogMessage(logger, level, message.c_str(), __FILE__, __LINE__, "MaiaExecutionProvider");
    if (s) ort->ReleaseStatus(s);
  }

  void log_fusion(const std::string& partition, const Engine& engine) const {
    log(ORT_LOGGING_LEVEL_INFO, "partition " + partition + ": " + std::to_string(engine.fused_pairs()) +
                                    " FP8 QuantizeLinear->DequantizeLinear pairs run as one fake-quant pass");
  }

  std::unique_ptr<Kernel> compile_context(const OrtGraph* graph, const OrtNode* node, const OrtNode* fused);
  std::unique_ptr<Kernel> compile_plain(const OrtGraph* graph, const OrtNode* fused);
  std::unique_ptr<Kernel> compile_program(const std::shared_ptr<std::string>& program, const OrtNode* fused);
  OrtNode* context_node(const OrtGraph* graph, const OrtNode* fused, const std::string& partition,
                        const std::string& payload, bool main_context);

  static const char* ORT_API_CALL GetNameImpl(const OrtEp*) noexcept { return kEpName; }
  static OrtStatus* ORT_API_CALL GetCapabilityImpl(OrtEp* self, const OrtGraph* graph,
                                                   OrtEpGraphSupportInfo* info) noexcept;
  static OrtStatus* ORT_API_CALL CompileImpl(OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes,
                                             size_t count, OrtNodeComputeInfo** infos,
                                             OrtNode** ep_context_nodes) noexcept;
  static void ORT_API_CALL ReleaseNodeComputeInfosImpl(OrtEp* self, OrtNodeComputeInfo** infos, size_t n) noexcept;
};

struct ComputeInfo : OrtNodeComputeInfo {
  explicit ComputeInfo(Ep& e) : OrtNodeComputeInfo{}, ep(e) {
    ort_version_supported = kOrtApiVersion;
    CreateState = CreateStateImpl;
    Compute = ComputeImpl;
    ReleaseState = ReleaseStateImpl;
  }
  Ep& ep;

  static OrtStatus* ORT_API_CALL CreateStateImpl(OrtNodeComputeInfo* self, OrtNodeComputeContext* context,
                                                 void** state) noexcept {
    MAIA_TRY
    Ep& ep = static_cast<ComputeInfo*>(self)->ep;
    std::string name = ep_api->NodeComputeContext_NodeName(context);
    std::lock_guard<std::mutex> lock(ep.mutex);
    auto it = ep.kernels.find(name);
    if (it == ep.kernels.end()) throw Error("no compiled Maia partition for fused node " + name);
    *state = it->second.get();
    return nullptr;
    MAIA_CATCH
  }
  static OrtStatus* ORT_API_CALL ComputeImpl(OrtNodeComputeInfo*, void* state, OrtKernelContext* context) noexcept {
    MAIA_TRY
    Kernel& kernel = *static_cast<Kernel*>(state);
    std::vector<const OrtValue*> inputs(kernel.in_slots.size(), nullptr);
    for (size_t i = 0; i < inputs.size(); ++i) check(ort->KernelContext_GetInput(context, kernel.in_slots[i], &inputs[i]));
    kernel.engine->run(context, inputs, kernel.out_slots);
    return nullptr;
    MAIA_CATCH
  }
  static void ORT_API_CALL ReleaseStateImpl(OrtNodeComputeInfo*, void*) noexcept {}
};

class Factory : public OrtEpFactory {
 public:
  Factory() : OrtEpFactory{} {
    ort_version_supported = kOrtApiVersion;
    GetName = [](const OrtEpFactory*) noexcept -> const char* { return kEpName; };
    GetVendor = [](const OrtEpFactory*) noexcept -> const char* { return "maia-onnx"; };
    GetVendorId = [](const OrtEpFactory*) noexcept -> uint32_t { return 0; };
    GetVersion = [](const OrtEpFactory*) noexcept -> const char* { return kVersion; };
    GetSupportedDevices = GetSupportedDevicesImpl;
    CreateEp = CreateEpImpl;
    ReleaseEp = [](OrtEpFactory*, OrtEp* ep) noexcept { delete static_cast<Ep*>(ep); };
    ValidateCompiledModelCompatibilityInfo = [](OrtEpFactory*, const OrtHardwareDevice* const*, size_t, const char*,
                                                OrtCompiledModelCompatibility* out) noexcept -> OrtStatus* {
      *out = OrtCompiledModelCompatibility_EP_NOT_APPLICABLE;
      return nullptr;
    };
    CreateAllocator = [](OrtEpFactory*, const OrtMemoryInfo*, const OrtKeyValuePairs*,
                         OrtAllocator** allocator) noexcept -> OrtStatus* {
      *allocator = nullptr;  // host memory only: ORT's CPU allocator serves every tensor
      return nullptr;
    };
    ReleaseAllocator = [](OrtEpFactory*, OrtAllocator*) noexcept {};
    CreateDataTransfer = [](OrtEpFactory*, OrtDataTransferImpl** transfer) noexcept -> OrtStatus* {
      *transfer = nullptr;
      return nullptr;
    };
    IsStreamAware = [](const OrtEpFactory*) noexcept { return false; };
    CreateSyncStreamForDevice = [](OrtEpFactory*, const OrtMemoryDevice*, const OrtKeyValuePairs*,
                                   OrtSyncStreamImpl** stream) noexcept -> OrtStatus* {
      *stream = nullptr;
      return nullptr;
    };
    const std::string dir = library_dir();
    table = CapabilityTable::load(dir + "/../capability_table.json");
    profiles = load_profiles(dir + "/../devices");
    if (profiles.empty()) throw Error("no Maia device profiles found beside " + dir);
  }

  CapabilityTable table;
  std::vector<DeviceProfile> profiles;

  const DeviceProfile* profile(const std::string& name) const {
    for (const auto& p : profiles)
      if (p.name == name) return &p;
    return nullptr;
  }

  static OrtStatus* ORT_API_CALL GetSupportedDevicesImpl(OrtEpFactory* self, const OrtHardwareDevice* const* devices,
                                                         size_t num_devices, OrtEpDevice** ep_devices,
                                                         size_t max_ep_devices, size_t* num_ep_devices) noexcept {
    MAIA_TRY
    auto* factory = static_cast<Factory*>(self);
    *num_ep_devices = 0;
    for (size_t i = 0; i < num_devices; ++i) {
      if (ort->HardwareDevice_Type(devices[i]) != OrtHardwareDeviceType_CPU) continue;
      // the emulated Maia devices live on the host CPU: one EP device per device profile
      for (const DeviceProfile& p : factory->profiles) {
        if (*num_ep_devices >= max_ep_devices) break;
        OrtKeyValuePairs* metadata = nullptr;
        OrtKeyValuePairs* options = nullptr;
        ort->CreateKeyValuePairs(&metadata);
        ort->CreateKeyValuePairs(&options);
        ort->AddKeyValuePair(metadata, "maia.device", p.name.c_str());
        ort->AddKeyValuePair(metadata, "maia.description", p.description.c_str());
        ort->AddKeyValuePair(metadata, "maia.profile", p.path.c_str());
        ort->AddKeyValuePair(options, "device", p.name.c_str());
        OrtEpDevice* device = nullptr;
        OrtStatus* status = ep_api->CreateEpDevice(factory, devices[i], metadata, options, &device);
        ort->ReleaseKeyValuePairs(metadata);
        ort->ReleaseKeyValuePairs(options);
        if (status) return status;
        ep_devices[(*num_ep_devices)++] = device;
      }
      break;  // one host CPU is enough
    }
    return nullptr;
    MAIA_CATCH
  }

  static OrtStatus* ORT_API_CALL CreateEpImpl(OrtEpFactory* self, const OrtHardwareDevice* const*,
                                              const OrtKeyValuePairs* const* metadata, size_t num_devices,
                                              const OrtSessionOptions* options, const OrtLogger* logger,
                                              OrtEp** ep) noexcept {
    MAIA_TRY
    auto* factory = static_cast<Factory*>(self);
    *ep = nullptr;
    std::string device;
    if (num_devices > 0 && metadata && metadata[0]) {
      const char* d = ort->GetKeyValue(metadata[0], "maia.device");
      if (d) device = d;
    }
    device = session_option(options, std::string(kOptionPrefix) + "device", device.empty() ? "maia100" : device);
    const DeviceProfile* profile = factory->profile(device);
    if (profile == nullptr) {
      std::string known;
      for (const auto& p : factory->profiles) known += (known.empty() ? "" : ", ") + p.name;
      throw Error("unknown Maia device profile '" + device + "': use one of " + known, ORT_INVALID_ARGUMENT);
    }
    std::set<std::string> cpu_ops;
    std::stringstream ss(session_option(options, std::string(kOptionPrefix) + "cpu_ops", ""));
    std::string op;
    while (std::getline(ss, op, ','))
      if (!op.empty()) cpu_ops.insert(op);
    ContextOptions context;
    context.enable = session_option(options, "ep.context_enable", "0") == "1";
    context.embed = session_option(options, "ep.context_embed_mode", "1") == "1";
    context.model_path = session_option(options, "ep.context_file_path", "");
    std::stringstream dims(session_option(options, std::string(kOptionPrefix) + "dims", ""));
    std::string item;
    while (std::getline(dims, item, ',')) {
      auto eq = item.find('=');
      if (item.empty()) continue;
      try {
        if (eq == std::string::npos) throw std::invalid_argument(item);
        context.dims[item.substr(0, eq)] = std::stoll(item.substr(eq + 1));
      } catch (const std::exception&) {
        throw Error("bad Maia dims option '" + item + "': use name=size pairs, e.g. batch=1,seq=128",
                    ORT_INVALID_ARGUMENT);
      }
    }
    *ep = new Ep(*factory, *profile, std::move(cpu_ops), std::move(context), logger);
    return nullptr;
    MAIA_CATCH
  }
};

Ep::Ep(Factory& f, DeviceProfile p, std::set<std::string> ops, ContextOptions ctx, const OrtLogger* l)
    : OrtEp{}, factory(f), profile(std::move(p)), cpu_ops(std::move(ops)), context(std::move(ctx)), logger(l) {
  ort_version_supported = kOrtApiVersion;
  GetName = GetNameImpl;
  GetCapability = GetCapabilityImpl;
  Compile = CompileImpl;
  ReleaseNodeComputeInfos = ReleaseNodeComputeInfosImpl;
}

OrtStatus* ORT_API_CALL Ep::GetCapabilityImpl(OrtEp* self, const OrtGraph* graph,
                                              OrtEpGraphSupportInfo* info) noexcept {
  MAIA_TRY
  Ep& ep = *static_cast<Ep*>(self);
  size_t n = 0;
  check(ort->Graph_GetNumNodes(graph, &n));
  std::vector<const OrtNode*> nodes(n);
  if (n) check(ort->Graph_GetNodes(graph, nodes.data(), n));
  bool compiled = false;
  OrtNodeFusionOptions keep{};
  keep.ort_version_supported = kOrtApiVersion;
  keep.drop_constant_initializers = false;
  for (const OrtNode* node : nodes) {
    if (!is_maia_context(node)) continue;
    compiled = true;  // the compiler already placed every node: claim its partitions, leave the rest to the CPU
    check(ep_api->EpGraphSupportInfo_AddNodesToFuse(info, &node, 1, &keep));
  }
  if (compiled) return nullptr;
  OrtNodeFusionOptions drop{};
  drop.ort_version_supported = kOrtApiVersion;
  drop.drop_constant_initializers = true;  // Compile copies the weights it needs
  for (const auto& part : plain_partitions(graph, ep.factory.table, ep.profile, ep.cpu_ops, ep.context.enable))
    check(ep_api->EpGraphSupportInfo_AddNodesToFuse(info, part.data(), part.size(), &drop));
  return nullptr;
  MAIA_CATCH
}

std::unique_ptr<Kernel> Ep::compile_context(const OrtGraph* graph, const OrtNode* node, const OrtNode* fused) {
  std::string partition = node_name(node);
  read_string_attr(node, "partition_name", partition);
  int64_t embed_mode = 1;
  read_int_attr(node, "embed_mode", embed_mode);
  std::string context;
  // program bytes (a trailing NUL some ORT versions add is harmless: the header gives every length)
  if (!read_bytes_attr(node, "ep_cache_context", context))
    throw Error("EPContext node " + partition + " has no ep_cache_context: recompile the model", ORT_INVALID_GRAPH);
  std::string arch;
  if (read_string_attr(node, "hardware_architecture", arch) && arch != profile.name)
    log(ORT_LOGGING_LEVEL_WARNING, "partition " + partition + " was compiled for " + arch + ", running as " +
                                       profile.name + " (the program carries its own numerics)");
  Program program;
  if (embed_mode == 1) {
    auto bytes = std::make_shared<std::string>(std::move(context));
    program = parse_program(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size(), bytes);
  } else {
    while (!context.empty() && context.back() == '\0') context.pop_back();
    const ORTCHAR_T* model_path = nullptr;
    check(ort->Graph_GetModelPath(graph, &model_path));
    std::string model = model_path ? model_path : "";
    if (model.empty())
      throw Error("EPContext " + partition + " uses a side file (" + context +
                      ") but the model came from bytes: create the session from the model's path",
                  ORT_INVALID_ARGUMENT);
    auto slash = model.rfind('/');
    std::string dir = slash == std::string::npos ? "." : model.substr(0, slash);
    std::string path = dir + "/" + context;
    char resolved[PATH_MAX];
    if (!realpath(path.c_str(), resolved))  // the shim's message, word for word
      throw Error("Maia context side file " + context + " of partition '" + partition + "' not found in " + dir +
                      ": copy it beside the model",
                  ORT_NO_SUCHFILE);
    path = resolved;
    program = side_files.program(path, partition);
  }
  auto kernel = std::make_unique<Kernel>();
  kernel->engine = engine_from_program(program);
  log_fusion(partition, *kernel->engine);
  kernel->in_slots = slots(kernel->engine->input_names(), io_names(fused, true), "input");
  kernel->out_slots = slots(kernel->engine->output_names(), io_names(fused, false), "output");
  return kernel;
}

std::unique_ptr<Kernel> Ep::compile_plain(const OrtGraph* graph, const OrtNode* fused) {
  std::vector<Weight> weights;
  std::vector<std::string> inputs, outputs;
  std::shared_ptr<std::vector<std::vector<uint8_t>>> store;
  std::string model = serialize_graph(graph, weights, inputs, outputs, store);
  auto kernel = std::make_unique<Kernel>();
  kernel->engine = std::make_unique<Engine>(model, std::move(weights), inputs, outputs, store);
  log_fusion(node_name(fused), *kernel->engine);
  kernel->in_slots = slots(inputs, io_names(fused, true), "input");
  kernel->out_slots = slots(outputs, io_names(fused, false), "output");
  return kernel;
}

std::unique_ptr<Kernel> Ep::compile_program(const std::shared_ptr<std::string>& program, const OrtNode* fused) {
  auto kernel = std::make_unique<Kernel>();
  // the engine runs the very program the EPContext node carries (parsed back, as a compiled model loads it)
  kernel->engine = engine_from_program(
      parse_program(reinterpret_cast<const uint8_t*>(program->data()), program->size(), program));
  log_fusion(node_name(fused), *kernel->engine);
  kernel->in_slots = slots(kernel->engine->input_names(), io_names(fused, true), "input");
  kernel->out_slots = slots(kernel->engine->output_names(), io_names(fused, false), "output");
  return kernel;
}

OrtNode* Ep::context_node(const OrtGraph* graph, const OrtNode* fused, const std::string& partition,
                          const std::string& payload, bool main_context) {
  const OrtModelEditorApi* editor = ort->GetModelEditorApi();
  if (editor == nullptr) throw Error("this ONNX Runtime build cannot create EPContext nodes (minimal build)");
  std::vector<OrtOpAttr*> attrs;
  struct Release {
    std::vector<OrtOpAttr*>& attrs;
    ~Release() {
      for (OrtOpAttr* a : attrs) ort->ReleaseOpAttr(a);
    }
  } release{attrs};
  auto text = [&](const char* name, const std::string& value) {
    if (value.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
      throw Error("Maia program of " + partition + " is too big to embed: compile with the programs in a side file");
    OrtOpAttr* a = nullptr;
    check(ort->CreateOpAttr(name, value.data(), static_cast<int>(value.size()), ORT_OP_ATTR_STRING, &a));
    attrs.push_back(a);
  };
  auto integer = [&](const char* name, int64_t value) {
    OrtOpAttr* a = nullptr;
    check(ort->CreateOpAttr(name, &value, 1, ORT_OP_ATTR_INT, &a));
    attrs.push_back(a);
  };
  text("source", kEpName);
  integer("main_context", main_context ? 1 : 0);
  integer("embed_mode", context.embed ? 1 : 0);
  text("ep_cache_context", payload);
  text("ep_sdk_version", "maia-onnx-emulator-1");  // runtime/compile.py EP_SDK_VERSION
  text("partition_name", partition);
  text("hardware_architecture", profile.name);
  const ORTCHAR_T* model_path = nullptr;
  check(ort->Graph_GetModelPath(graph, &model_path));
  std::string source = model_path ? model_path : "";
  if (!source.empty()) text("onnx_model_filename", source.substr(source.rfind('/') + 1));
  std::vector<std::string> ins = io_names(fused, true), outs = io_names(fused, false);
  std::vector<const char*> in_ptrs, out_ptrs;
  for (const auto& n : ins) in_ptrs.push_back(n.c_str());
  for (const auto& n : outs) out_ptrs.push_back(n.c_str());
  OrtNode* node = nullptr;
  // ORT swaps each fused node for the EPContext node of the same name
  check(editor->CreateNode("EPContext", "com.microsoft", node_name(fused).c_str(), in_ptrs.data(), in_ptrs.size(),
                           out_ptrs.data(), out_ptrs.size(), attrs.data(), attrs.size(), &node));
  return node;
}

OrtStatus* ORT_API_CALL Ep::CompileImpl(OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes,
                                        size_t count, OrtNodeComputeInfo** infos,
                                        OrtNode** ep_context_nodes) noexcept {
  MAIA_TRY
  Ep& ep = *static_cast<Ep*>(self);
  for (size_t i = 0; i < count; ++i) {
    infos[i] = nullptr;
    if (ep_context_nodes) ep_context_nodes[i] = nullptr;
  }
  std::vector<std::pair<std::string, std::shared_ptr<std::string>>> written;  // programs for EPContext nodes
  for (size_t i = 0; i < count; ++i) {
    size_t n = 0;
    check(ort->Graph_GetNumNodes(graphs[i], &n));
    std::vector<const OrtNode*> nodes(n);
    if (n) check(ort->Graph_GetNodes(graphs[i], nodes.data(), n));
    std::unique_ptr<Kernel> kernel;
    if (n == 1 && is_maia_context(nodes[0])) {
      if (ep.context.enable)
        throw Error("model already contains Maia EPContext nodes (it is compiled): compile the original model instead",
                    ORT_INVALID_GRAPH);
      kernel = ep.compile_context(graphs[i], nodes[0], fused_nodes[i]);
    } else if (ep.context.enable) {
      const std::string partition = "maia_partition_" + std::to_string(ep.next_partition++);
      auto program = std::make_shared<std::string>(write_program(graphs[i], partition, ep.profile.name,
                                                                 ep.context.dims));
      kernel = ep.compile_program(program, fused_nodes[i]);
      written.push_back({partition, program});
    } else {
      kernel = ep.compile_plain(graphs[i], fused_nodes[i]);
    }
    {
      std::lock_guard<std::mutex> lock(ep.mutex);
      ep.kernels[node_name(fused_nodes[i])] = std::move(kernel);
    }
    infos[i] = new ComputeInfo(ep);
  }
  if (!written.empty()) {
    if (ep_context_nodes == nullptr) throw Error("ONNX Runtime asked for an EPContext model but gave no node slots");
    std::string side_name;
    if (!ep.context.embed) {
      const std::string& out = ep.context.model_path;
      if (out.empty())
        throw Error("writing Maia programs to a side file needs the output model's path: compile to a file, or "
                    "embed the programs (embed_compiled_data_into_model=True)", ORT_INVALID_ARGUMENT);
      const size_t slash = out.rfind('/');
      const std::string dir = slash == std::string::npos ? "" : out.substr(0, slash + 1);
      std::string stem = out.substr(slash == std::string::npos ? 0 : slash + 1);
      const size_t dot = stem.rfind('.');
      if (dot != std::string::npos && dot > 0) stem = stem.substr(0, dot);
      side_name = stem + "_maia.bin";  // runtime/compile.py: <output stem>_maia.bin beside the model
      std::vector<std::pair<std::string, std::string>> programs;
      for (const auto& [name, bytes] : written) programs.emplace_back(name, *bytes);
      write_container(dir + side_name, programs);
    }
    for (size_t k = 0; k < written.size(); ++k) {
      const auto& [name, bytes] = written[k];
      if (ep.context.embed && bytes->size() > kEmbedLimitBytes)
        throw Error("Maia program " + name + " exceeds 1430 MiB, too big to embed in the ONNX file (protobuf limit "
                    "2 GiB): compile with the programs in a side file", ORT_INVALID_ARGUMENT);
      ep_context_nodes[k] = ep.context_node(graphs[k], fused_nodes[k], name, ep.context.embed ? *bytes : side_name,
                                            ep.context.embed || k == 0);
    }
  }
  return nullptr;
  MAIA_CATCH
}

void ORT_API_CALL Ep::ReleaseNodeComputeInfosImpl(OrtEp*, OrtNodeComputeInfo** infos, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) delete static_cast<ComputeInfo*>(infos[i]);
}

}  // namespace
}  // namespace maia

extern "C" {

__attribute__((visibility("default"))) OrtStatus* CreateEpFactories(const char* /*registered_name*/,
                                                                    const OrtApiBase* api_base,
                                                                    const OrtLogger* /*default_logger*/,
                                                                    OrtEpFactory** factories, size_t max_factories,
                                                                    size_t* num_factories) {
  *num_factories = 0;
  const OrtApi* api = api_base->GetApi(maia::kOrtApiVersion);
  if (api == nullptr) return nullptr;  // ORT older than 1.23: no plugin EPs (it would not load us anyway)
  maia::ort = api;
  maia::ep_api = api->GetEpApi();
  if (max_factories < 1) return api->CreateStatus(ORT_INVALID_ARGUMENT, "no room for the Maia EP factory");
  try {
    factories[0] = new maia::Factory();
    *num_factories = 1;
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("MaiaExecutionProvider: ") + e.what()).c_str());
  }
}

__attribute__((visibility("default"))) OrtStatus* ReleaseEpFactory(OrtEpFactory* factory) {
  delete static_cast<maia::Factory*>(factory);
  return nullptr;
}

}  // extern "C"
