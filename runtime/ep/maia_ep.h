// Shared declarations of the Maia plugin execution provider (see maia_ep.cc for the ORT entry points).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"
#include "onnxruntime_c_api.h"  // includes onnxruntime_ep_c_api.h (the plugin-EP ABI)

namespace maia {

// The C API version this library is written against: GetApi is called with it, never with the header's newest.
constexpr uint32_t kOrtApiVersion = 23;
constexpr const char* kEpName = "MaiaExecutionProvider";
constexpr const char* kOptionPrefix = "ep.maiaexecutionprovider.";  // ORT lower-cases the EP name in session config

extern const OrtApi* ort;
extern const OrtEpApi* ep_api;

struct Error : std::runtime_error {
  OrtErrorCode code;
  explicit Error(const std::string& message, OrtErrorCode c = ORT_EP_FAIL) : std::runtime_error(message), code(c) {}
};

// Throws the status's message as an Error (and releases the status).
void check(OrtStatus* status);

// Element type, dims and byte size of a tensor OrtValue; ``what`` names it in the error a string tensor raises.
struct TensorLayout {
  ONNXTensorElementDataType elem = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  size_t bytes = 0;
};
TensorLayout describe_tensor(const OrtValue* value, const char* what);

// ONNX element types by name (as the program header and the capability table spell them) and back.
int32_t element_type(const std::string& name);
std::string element_type_name(int32_t type);
size_t element_bytes(int32_t type, size_t count);  // packed 4-bit types take half a byte per element

// Fused FP8 fake-quantization (fake_quant.cc): com.maia.emulator::FakeQuantFp8 in the engines' inner sessions.
constexpr const char* kFakeQuantDomain = "com.maia.emulator";
constexpr const char* kFakeQuantOp = "FakeQuantFp8";
OrtCustomOpDomain* fake_quant_domain();
// float(fp8(x / scale)) * scale with ORT's QuantizeLinear (saturate) + DequantizeLinear numerics, per tensor.
void fake_quant_fp8(const float* x, float* y, size_t n, float scale, bool e5m2);

// A weight as the device stores it: points into a program (embedded bytes or a memory-mapped side file) or into
// a buffer the engine owns. ``e8m0``: one biased exponent byte per element, decoded to FLOAT for the session.
struct Weight {
  std::string name;
  int32_t dtype = 0;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  bool e8m0 = false;
};

// Runs one device partition: the partition's ONNX graph (no weights) in an inner ORT CPU session, weights decoded
// with maia_onnx.formats' rules and handed over without copies. Mirrors maia_onnx.runtime.emulator exactly.
class Engine {
 public:
  Engine(const std::string& model_bytes, std::vector<Weight> weights, std::vector<std::string> input_names,
         std::vector<std::string> output_names, std::shared_ptr<void> storage);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::vector<std::string>& input_names() const { return input_names_; }
  const std::vector<std::string>& output_names() const { return output_names_; }
  size_t fused_pairs() const { return fused_pairs_; }  // QuantizeLinear->DequantizeLinear pairs run as one pass
  // inputs[i] feeds input_names()[i]; outputs go to the kernel context's output slot out_slots[j].
  void run(OrtKernelContext* context, const std::vector<const OrtValue*>& inputs, const std::vector<size_t>& out_slots);

 private:
  std::vector<std::string> input_names_;
  std::vector<std::string> output_names_;
  std::vector<std::string> feed_names_;      // inputs plus folded weights (fed on every run)
  std::vector<OrtValue*> weight_feeds_;       // OrtValues over folded FP8 weights
  std::vector<OrtValue*> initializers_;       // external initializers handed to the session
  std::vector<std::vector<uint8_t>> owned_;   // decoded buffers (folded FP8, E8M0 scales)
  std::shared_ptr<void> storage_;             // keeps program bytes / side-file mapping alive
  OrtMemoryInfo* cpu_ = nullptr;
  OrtEnv* env_ = nullptr;
  OrtSession* session_ = nullptr;
  size_t fused_pairs_ = 0;
};

// A loaded Maia program (MAIAPRG1): header, graph bytes and weights, over storage kept alive by ``storage``.
struct Program {
  Json header;
  const uint8_t* base = nullptr;  // start of the graph/weights area
  std::shared_ptr<void> storage;
  std::string name() const { return header["partition_name"].str; }
};
Program parse_program(const uint8_t* data, size_t size, std::shared_ptr<void> storage);
std::unique_ptr<Engine> engine_from_program(const Program& program);

// Side files (MAIACTX1 containers) memory-mapped once per path.
class SideFiles {
 public:
  Program program(const std::string& path, const std::string& partition);

 private:
  struct Mapped;
  std::map<std::string, std::shared_ptr<Mapped>> files_;
};

// The capability table (runtime/capability_table.json) and a device profile, for plain (not compiled) models.
struct Rule {
  std::string kind;
  std::set<std::string> dtypes;
  int max_spatial_dims = -1;
  std::string attribute, attribute_default;
  std::vector<std::string> allowed;
};

struct CapabilityTable {
  std::map<std::string, std::string> canonical;  // ONNX element type name -> canonical dtype
  std::set<std::string> tensor_precision;
  std::set<std::string> compute_kinds;
  std::map<std::pair<std::string, std::string>, Rule> rules;  // (domain, op_type)
  static CapabilityTable load(const std::string& path);
};

struct DeviceProfile {
  std::string name, description, path;
  std::set<std::string> peak_dtypes;
  std::map<std::string, std::string> compute_dtype_map;
  bool supports_precision(const std::string& canon) const;
};
std::vector<DeviceProfile> load_profiles(const std::string& builtin_dir);

// GetCapability for a plain graph: the device partitions (node lists) the table and profile allow. With
// ``wide_boundaries`` (compiling to an EPContext model) no narrow (FP8/4-bit) value crosses a partition boundary.
std::vector<std::vector<const OrtNode*>> plain_partitions(const OrtGraph* graph, const CapabilityTable& table,
                                                          const DeviceProfile& profile,
                                                          const std::set<std::string>& cpu_ops,
                                                          bool wide_boundaries = false);
// A fused plain partition as an ONNX model (no weights) plus its weights: copies (ORT drops its own after
// Compile), or with ``copy_weights`` false pointers into ORT's initializers, valid while Compile runs.
std::string serialize_graph(const OrtGraph* graph, std::vector<Weight>& weights, std::vector<std::string>& inputs,
                            std::vector<std::string>& outputs, std::shared_ptr<std::vector<std::vector<uint8_t>>>& store,
                            bool copy_weights = true);

// Writes a fused plain partition as a Maia program (MAIAPRG1, the layout runtime/compile.py writes): header JSON
// (sorted keys), the partition's ONNX graph, its weights in device formats (FP8 as stored, MX elements, E8M0
// scales as exponent bytes), the schedule and a liveness-based memory arena plan at ``dims``.
std::string write_program(const OrtGraph* graph, const std::string& partition, const std::string& device,
                          const std::map<std::string, int64_t>& dims);
// A MAIACTX1 side file: the programs, then the JSON index {partition: [offset, length]}; written atomically.
void write_container(const std::string& path, const std::vector<std::pair<std::string, std::string>>& programs);

// A value's tensor type as ORT knows it (dims -1 where symbolic or unknown; symbols "" where unnamed).
struct TypeInfo {
  bool tensor = false;
  int32_t elem = 0;
  std::vector<int64_t> dims;
  std::vector<std::string> symbols;
};
TypeInfo type_of(const OrtValueInfo* value);
std::vector<const OrtValueInfo*> node_values(const OrtNode* node, bool inputs);

// Attribute helpers over OrtNode.
bool read_string_attr(const OrtNode* node, const char* name, std::string& out);  // text: trailing NULs dropped
bool read_bytes_attr(const OrtNode* node, const char* name, std::string& out);   // binary, as ORT returns it
std::string read_attr(const OrtOpAttr* attr, OrtOpAttrType type);
bool read_int_attr(const OrtNode* node, const char* name, int64_t& out);
std::string value_name(const OrtValueInfo* value);

}  // namespace maia
